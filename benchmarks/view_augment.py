"""The cost of per-view augmentation recipes (``data.views``) on the resident data path.

    python benchmarks/view_augment.py                       # CPU, CIFAR-size images, batch 128, 3 views
    python benchmarks/view_augment.py --device cuda --rounds 20

Times making one global batch of 3 views (gather, crop + flip, the recipe's operations, normalisation) with
the default views (``crop+flip`` x 3, the reference) and with OKDPH's CIFAR-100 views (``crop+flip+rotate``,
``crop+flip+cutout``, ``crop+randaugment``), alternating, ``--rounds`` rounds of ``--batches`` batches each, and
for scale one training step of OKDPH on ResNet-32 (2 students + the hybrid model, fp32) on the same device.
Prints the medians and ``ratio_vs_reference=<okdph views / default views>``; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from okd.config import load_config  # noqa: E402
from okd.data import BatchStream, Normalizer  # noqa: E402
from okd.data.splits import Split  # noqa: E402
from okd.data.view_augment import parse  # noqa: E402
from okd.hardware import cpu_name, device_name  # noqa: E402

OKDPH_VIEWS = ["crop+flip+rotate", "crop+flip+cutout", "crop+randaugment"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(stream, epoch, batches, device) -> float:
    draws = stream.draws(epoch)
    sync(device)
    start = time.perf_counter()
    for b in range(batches):
        stream.batch(b, draws)
    sync(device)
    return (time.perf_counter() - start) / batches


def time_step(device, batch_size) -> float:
    from okd.methods import build_configured_method
    from okd.optim import Optimization

    cfg = load_config(None, ["method.name=okdph", "model.name=resnet32", "device=cpu"])
    method = build_configured_method(cfg, 100).to(device).train()
    opt = Optimization.build(cfg, method, device)
    views = [torch.randn(batch_size, 3, 32, 32, device=device) for _ in range(3)]
    labels = torch.randint(0, 100, (batch_size,), device=device)
    times = []
    for i in range(4):
        sync(device)
        start = time.perf_counter()
        loss, _ = method.training_loss(views, labels, epoch=0)
        opt.optimizer.zero_grad()
        loss.backward()
        opt.step(torch.zeros((), device=device))
        sync(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-step", action="store_true", help="skip the training step's timing")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    device = torch.device(args.device)
    n = args.batch_size * args.batches
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 100)
    normalize = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), device)

    def stream(recipes):
        return BatchStream(split, normalize, 3, args.batch_size, 4, True, seed=0, device=device,
                           recipes=[parse(r) for r in recipes] if recipes else None)

    default, okdph = stream(None), stream(OKDPH_VIEWS)
    time_batches(default, 0, 2, device), time_batches(okdph, 0, 2, device)  # warm-up
    ref, ours = [], []
    for r in range(args.rounds):
        ref.append(time_batches(default, r, args.batches, device))
        ours.append(time_batches(okdph, r, args.batches, device))
    step = None if args.no_step else time_step(device, args.batch_size)
    where = device_name(device) if device.type == "cuda" else cpu_name()
    result = {"device": where, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch_size": args.batch_size, "views": 3, "default_ms": 1e3 * statistics.median(ref),
              "okdph_views_ms": 1e3 * statistics.median(ours),
              "okdph_step_ms": None if step is None else 1e3 * step,
              "ratio_vs_reference": statistics.median(o / r for o, r in zip(ours, ref))}
    print(f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}: one batch of {args.batch_size} "
          f"images x 3 views, median of {args.rounds} rounds")
    print(f"  default views (crop+flip x 3): {result['default_ms']:.2f} ms")
    print(f"  OKDPH's views (rotate, cutout, randaugment): {result['okdph_views_ms']:.2f} ms")
    if step is not None:
        print(f"  one OKDPH ResNet-32 training step (fp32): {result['okdph_step_ms']:.0f} ms")
    print(f"ratio_vs_reference={result['ratio_vs_reference']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
