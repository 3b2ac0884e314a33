"""The cost of the diversity and calibration sums (okd.diagnostics) in an evaluation.

    python benchmarks/diagnostics_cost.py                    # PCL ResNet-32, 1,000 CIFAR-size images, CPU
    python benchmarks/diagnostics_cost.py --device cuda --images 10000

Times ``okd.evaluate.evaluate`` of PCL (8 evaluated models: 3 peers, 3 temporal-mean peers, 2 ensembles)
with the diagnostics and with their per-batch sums switched off, alternating, ``--rounds`` rounds; prints the
medians and ``ratio_vs_reference=<with / without>`` (the target is at most 1.05).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from okd import diagnostics  # noqa: E402
from okd.data import Normalizer  # noqa: E402
from okd.evaluate import evaluate  # noqa: E402
from okd.hardware import cpu_name, device_name  # noqa: E402
from okd.methods import METHODS, build_method  # noqa: E402
from okd.models import backbone_spec  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    method = build_method("pcl", backbone_spec(args.model, 100), 100, METHODS.get("pcl").Options()).to(device)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (args.images,), device=device)
    normalize = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), device)
    real_add = diagnostics.Diagnostics.add

    def timed(with_sums: bool) -> float:
        diagnostics.Diagnostics.add = real_add if with_sums else (lambda self, outputs, labels: None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        evaluate(method, images, labels, normalize, args.batch_size, 100)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(True), timed(False)  # warm-up
    on, off = [], []
    for _ in range(args.rounds):
        off.append(timed(False))
        on.append(timed(True))
    diagnostics.Diagnostics.add = real_add
    where = device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}: PCL {args.model}, "
          f"{args.images} images, batch {args.batch_size}, median of {args.rounds} rounds")
    print(f"  evaluation without the diagnostics' sums: {statistics.median(off):.3f} s")
    print(f"  evaluation with them: {statistics.median(on):.3f} s")
    print(f"ratio_vs_reference={statistics.median(a / b for a, b in zip(on, off)):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
