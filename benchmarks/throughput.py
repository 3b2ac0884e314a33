"""Training throughput of okd's PCL step against the seed's execution style, measured in one process.

    python benchmarks/throughput.py                                   # PCL ResNet-32, batch 128, this machine
    python benchmarks/throughput.py --model resnet110 --device cuda --json out.json

The **reference** path is implemented here, independently of okd's trainer, the way the seed ran:
a DataLoader whose workers turn each image into a PIL image and apply RandomCrop(32, 4) +
RandomHorizontalFlip + ToTensor + Normalize three times (one per peer); then the shared trunk called
once per view, the branches and the three temporal-mean forwards one after another, and the temporal
mean updated with a per-tensor Python loop, in fp32.

The **okd** variants run okd's own trainer parts, ``BatchStream`` (uint8 tensors on the device, one batched
gather per view) and ``TrainStep``, under the configuration named by the variant:
``cl`` = channels_last, ``fused`` = the trunk once over all views (per-view BatchNorm), ``batched`` = the
branches as one grouped computation, ``graphs`` = the whole step as one CUDA graph, ``bf16`` / ``fp16`` =
autocast, ``compile`` = torch.compile (only with --compile). ``okd+auto`` is what a run on this device
uses by default (``okd.devices.resolve_auto``).

Hardware use: the FLOPs of one step are counted once (``torch.utils.flop_counter``: forward and
backward of the peers and the temporal-mean forwards, multiply-add = 2 FLOPs), and every variant's
achieved TFLOP/s is that count times its measured steps per second, and on a GPU okd knows
(``okd.hardware.PEAK_TFLOPS``: H100, H200, A100) the fraction of the data-sheet dense peak for the
variant's precision: how far the step is from the hardware limit.

What was measured is recorded beside each speed: every variant's ``graph`` (None for a variant without
graphs; else whether the step was captured, its replays, the check replay's gap to the eager step and,
when it ran eagerly, why) and, on CUDA, ``peak_memory_bytes`` (what its warm-up allocated at most above
what was allocated before it: its activations, or its graph's pool). A variant that asked for graphs but
ran eagerly is flagged in the table (``EAGER``) and warned about, so its speed is never taken for that
of graphs. ``okd+auto`` is measured once when it resolves to a listed variant.

Protocol: every variant is built and warmed up first; then ``--rounds`` rounds, in each of which every
variant runs ``--steps`` steps, round-robin, so that drifts of a shared machine hit all alike. Reported:
median img/s over rounds, min and max, and the ratio of medians to the reference. The data pipeline
alone is measured the same way. The last line is ``speedup_vs_reference=<ratio>`` for the default fast
configuration of the device (``--fast`` to choose another).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from okd.build import build_run_method, build_trainer  # noqa: E402
from okd.config import config_from_dict  # noqa: E402
from okd.data.splits import Dataset, Split  # noqa: E402
from okd.devices import resolve_auto, set_up_device  # noqa: E402
from okd.errors import OkdError  # noqa: E402
from okd.hardware import device_name, peak_tflops  # noqa: E402
from okd.methods.pcl import PCL  # noqa: E402
from okd.models import backbone_spec  # noqa: E402

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DEFAULT_FAST = {"cpu": "okd+auto", "cuda": "okd+auto"}
# on CUDA every combination of fused views and batched branches, eager and as one graph: grouped
# convolutions can be slower than separate ones in cuDNN, and whether batching still pays once the
# step is a graph (no launch overhead left to save) is what the device defaults must be chosen from
DEFAULT_VARIANTS = {"cpu": "okd,okd+cl,okd+cl+fused,okd+cl+batched,okd+cl+bf16",
                    "cuda": "okd,okd+cl+bf16,okd+cl+fused+bf16,okd+cl+batched+bf16,okd+cl+fused+batched+bf16,"
                            "okd+cl+bf16+graphs,okd+cl+fused+bf16+graphs,okd+cl+batched+bf16+graphs,"
                            "okd+cl+fused+batched+bf16+graphs"}


# ---------------------------------------------------------------- reference (the seed's style)

class PILViews(torch.utils.data.Dataset):
    """CIFAR-style dataset of HWC uint8 arrays; every item is 3 independently augmented views."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, views: int = 3):
        import torchvision.transforms as T

        self.images, self.labels, self.views = images_hwc, labels, views
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return [self.transform(img) for _ in range(self.views)], int(self.labels[i])


class ReferenceLoader:
    """An endless stream of batches from a DataLoader with workers, as the seed used."""

    def __init__(self, dataset, batch_size, workers, device):
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.device = device
        self.it = iter(self.loader)

    def next(self):
        try:
            views, labels = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            views, labels = next(self.it)
        nb = self.device.type == "cuda"
        return [v.to(self.device, non_blocking=nb) for v in views], labels.to(self.device, non_blocking=nb)


def kl_div_kd(student, teacher, T):
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction="batchmean") * T * T


class ReferenceStep:
    """The seed's order of work on okd's PCL modules (same networks, same loss)."""

    def __init__(self, method, lr=0.1):
        self.method = method
        self.opt = torch.optim.SGD(method.net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.step_count = 0

    def __call__(self, views, labels, epoch=100):
        net, mean = self.method.net, self.method.mean.module
        opt_, T = self.method.options, self.method.options.temperature
        m = opt_.num_peers
        feats, logits = [], []
        for j in range(m):  # the trunk once per view, branches one after another
            f, z = net.peers.branches[j](net.peers.trunk(views[j]))
            feats.append(f)
            logits.append(z)
        z_e = net.ensemble_fc(torch.cat(feats, 1))
        with torch.no_grad():
            mean_logits = [mean.peers.branches[l](mean.peers.trunk(views[l]))[1] for l in range(m)]
        w = 1.0
        loss = F.cross_entropy(z_e, labels)
        for j in range(m):
            loss = loss + F.cross_entropy(logits[j], labels) + w * kl_div_kd(logits[j], z_e.detach(), T)
            loss = loss + w * sum(kl_div_kd(logits[j], mean_logits[l], T) for l in range(m) if l != j) / (m - 1)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        decay = min(1 - 1 / (self.step_count + 1), opt_.ema_decay)
        with torch.no_grad():  # per-tensor Python loop
            for ema_p, p in zip(mean.parameters(), net.parameters()):
                ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)
        self.step_count += 1
        return loss


# ---------------------------------------------------------------- okd variants

def okd_config(variant, model, batch_size, device):
    flags = set(variant.split("+")[1:])
    tree = {"device": str(device), "data": {"name": "digits"}, "model": {"name": model},
            "method": {"name": "pcl"}, "train": {"batch_size": batch_size, "epochs": 300}}
    if "auto" not in flags:
        precision = "bf16" if "bf16" in flags else "fp16" if "fp16" in flags else "fp32"
        tree["method"]["fused_views"] = "fused" in flags
        tree["train"].update({"precision": precision, "channels_last": "cl" in flags, "compile": "compile" in flags,
                              "batched_branches": "batched" in flags, "cuda_graphs": "graphs" in flags})
    cfg, _ = resolve_auto(config_from_dict(tree), device)
    return cfg


def okd_trainer(variant, model, batch_size, images_u8, labels, device):
    cfg = okd_config(variant, model, batch_size, device)
    n = labels.numel()
    split = Split(images_u8, labels)
    dataset = Dataset("synthetic", split, Split(images_u8[:10], labels[:10]), [str(i) for i in range(100)],
                      CIFAR100_MEAN, CIFAR100_STD)
    method = build_run_method(cfg, 100, device)  # the run's own builder: seed 0, the variant's settings
    trainer = build_trainer(cfg, method, dataset, device)  # its MemoryLogger keeps the graph's capture line
    state = {"draws": trainer.stream.draws(0), "b": 0, "batches": n // batch_size}
    method.train()
    method.kd_scale.fill_(method.options.kd_scale(100) or 0.0)  # a late epoch: the full KD weight
    trainer.meter.load(trainer.state)
    trainer.train_step.start(trainer.state)

    def inputs():
        b = state["b"] % state["batches"]
        state["b"] += 1
        return trainer.stream.batch(b, state["draws"])

    def step():
        batch = inputs()
        return trainer.step(batch.views, batch.labels)

    return step, inputs, trainer


def graph_status(trainer):
    """Whether the variant's step ran as a CUDA graph, and why not: None for a variant without graphs."""
    if not trainer.cfg.train.cuda_graphs:
        return None
    graphed, log = trainer.graphed, [line for line in trainer.log.lines if "cuda graphs" in line]
    if graphed is None:  # asked for, but the trainer did not build one (no CUDA device, torchrun)
        return {"captured": False, "replays": 0, "replay_gap": None,
                "off_reason": f"not used on {trainer.device.type}", "log": log}
    return {"captured": graphed.captured, "replays": graphed.replays, "replay_gap": graphed.replay_gap,
            "off_reason": graphed.off_reason, "log": log}


def equivalent_variant(name, variants, model, batch_size, device):
    """A listed variant with the same resolved configuration as ``name`` (okd+auto is one of them on a GPU)."""
    target = okd_config(name, model, batch_size, device).to_dict()
    return next((v for v in variants if v != name and okd_config(v, model, batch_size, device).to_dict() == target),
                None)


def step_flops(trainer, inputs) -> float:
    """FLOPs of one training step (forward + backward + temporal-mean forwards), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = inputs()
    with FlopCounterMode(display=False) as counter:
        terms = trainer.method(batch.views, batch.labels)
        sum(terms.values()).backward()
    trainer.optimization.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns, rounds, steps, device, batch_size, settle=0.0):
    """{name: [img/s per round]}, each round running every fn ``steps`` times, round-robin.

    ``settle`` seconds of idle before each timing let the reference DataLoader's workers finish
    refilling their prefetch queue, so that they do not compete with the variant being timed.
    """
    results = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            results[name].append(batch_size * steps / (time.perf_counter() - t0))
    return results


def summarise(results, reference):
    ref = statistics.median(results[reference])
    return {name: {"median_img_per_s": statistics.median(v), "min_img_per_s": min(v), "max_img_per_s": max(v),
                   "ratio_to_reference": statistics.median(v) / ref, "rounds": v} for name, v in results.items()}


def print_table(title, summary):
    print(f"\n{title}")
    tflops = any("tflop_per_s" in s for s in summary.values())
    peaks = any(s.get("peak_fraction") is not None for s in summary.values())
    memory = any(s.get("peak_memory_bytes") is not None for s in summary.values())
    graphs = any(s.get("graph") is not None for s in summary.values())
    print(f"{'variant':<42} {'median img/s':>13} {'min':>9} {'max':>9} {'x reference':>12}"
          + (f" {'TFLOP/s':>8}" if tflops else "") + (f" {'% of peak':>10}" if peaks else "")
          + (f" {'peak MiB':>9}" if memory else "") + (f" {'graph':>9}" if graphs else ""))
    for name, s in summary.items():
        fraction, mem, graph = s.get("peak_fraction"), s.get("peak_memory_bytes"), s.get("graph")
        print(f"{name:<42} {s['median_img_per_s']:>13.1f} {s['min_img_per_s']:>9.1f} {s['max_img_per_s']:>9.1f} "
              f"{s['ratio_to_reference']:>12.2f}" + (f" {s['tflop_per_s']:>8.3f}" if tflops else "")
              + ((f" {100 * fraction:>9.1f}%" if fraction is not None else f" {'—':>10}") if peaks else "")
              + ((f" {mem / 2**20:>9.0f}" if mem is not None else f" {'—':>9}") if memory else "")
              + ((f" {('captured' if graph['captured'] else 'EAGER') if graph else '—':>9}") if graphs else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="pcl", choices=["pcl"], help="the reference reproduces the PCL seed")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--workers", type=int, default=0, help="reference DataLoader workers (0: one per core)")
    p.add_argument("--variants", help="comma-separated okd variants (flags: cl, fused, batched, graphs, bf16, fp16, "
                                      "compile; okd+auto: the device's defaults); default: per device")
    p.add_argument("--compile", action="store_true", help="also measure okd+cl+compile")
    p.add_argument("--fast", help="the variant whose ratio is the last line (default: per device)")
    p.add_argument("--images", type=int, default=0, help="synthetic training images (default: 32 batches)")
    p.add_argument("--settle", type=float, default=None,
                   help="idle seconds before timing each variant (lets the reference's workers finish prefetching; "
                        "default 1 on CPU, where they compete for the cores, 0.25 on CUDA)")
    p.add_argument("--json", help="write all measurements here")
    args = p.parse_args(argv)

    device = set_up_device(args.device)  # indexed, current and cuDNN autotuned, as in a training run
    settle = args.settle if args.settle is not None else (0.25 if device.type == "cuda" else 1.0)
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or cores)
    workers = args.workers or cores
    variants = [v for v in (args.variants or DEFAULT_VARIANTS[device.type]).split(",") if v]
    variants += ["okd+cl+compile"] if args.compile else []
    refused = {}  # variants whose settings a run on this device refuses (e.g. channels_last over a CPU hazard)
    for v in list(variants):
        try:
            okd_config(v, args.model, args.batch_size, device)
        except OkdError as exc:
            refused[v] = str(exc)
            variants.remove(v)
            print(f"skipping {v}: a run refuses it here: {exc}")
    fast = args.fast or DEFAULT_FAST[device.type]
    if fast in refused:
        print(f"the fast variant {fast} is refused here; okd+auto is measured instead")
        fast = "okd+auto"
    if fast not in variants:
        same = equivalent_variant(fast, variants, args.model, args.batch_size, device)
        if same is not None:
            print(f"{fast} on this device is {same}: measured once")
            fast = same
        else:
            variants.append(fast)
    n = args.images or 32 * args.batch_size
    rng = np.random.default_rng(0)
    images_hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels_np = rng.integers(0, 100, size=n).astype(np.int64)
    images_u8 = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(labels_np)

    print(f"okd throughput benchmark | PCL {args.model} batch {args.batch_size} | device {device} "
          f"({device_name(device)}) | "
          f"torch {torch.__version__} | threads {torch.get_num_threads()} | reference workers {workers}")

    # build everything first
    ref_loader = ReferenceLoader(PILViews(images_hwc, labels_np), args.batch_size, workers, device)
    torch.manual_seed(0)
    ref_method = PCL(backbone_spec(args.model, 100), 100, PCL.Options()).to(device).train()
    ref_step = ReferenceStep(ref_method)
    steps = {"reference": lambda: ref_step(*ref_loader.next())}
    pipes = {"reference": ref_loader.next}
    trainers = {}
    for v in variants:
        steps[v], pipes[v], trainers[v] = okd_trainer(v, args.model, args.batch_size, images_u8, labels, device)
    auto = okd_config("okd+auto", args.model, args.batch_size, device).train
    print(f"okd+auto on this device: precision {auto.precision}, channels_last {auto.channels_last}, "
          f"batched_branches {auto.batched_branches}, cuda_graphs {auto.cuda_graphs}")
    # warm up (compilation, cuDNN autotuning, allocator, worker start-up); each variant's peak memory
    # above what was allocated before its warm-up (its activations, or its graph's pool)
    peak_bytes = {}
    for name, fn in list(steps.items()) + list(pipes.items()):
        graphed = name in trainers and trainers[name].graphed is not None
        if device.type == "cuda" and name in steps and fn is steps[name]:
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(max(args.warmup, 5) if graphed else args.warmup):  # a graph is captured after 3 eager steps
            fn()
        if device.type == "cuda" and name in steps and fn is steps[name]:
            sync(device)
            peak_bytes[name] = torch.cuda.max_memory_allocated(device) - base
    sync(device)
    for name, trainer in trainers.items():
        status = graph_status(trainer)
        if status is not None and not status["captured"]:
            print(f"warning: {name} runs eagerly, not as a graph: {status['off_reason']}")

    pipe = summarise(time_rounds({"reference": pipes["reference"], "okd": pipes["okd" if "okd" in pipes else fast]},
                                 args.rounds, args.steps * 4, device, args.batch_size, settle=settle), "reference")
    train = summarise(time_rounds(steps, args.rounds, args.steps, device, args.batch_size, settle=settle),
                      "reference")
    counted = next((t for v, t in trainers.items() if "graphs" not in v), None)
    flops = step_flops(counted, pipes[variants[0]]) if counted is not None else 0.0
    for name, s in train.items():
        s["tflop_per_s"] = flops * s["median_img_per_s"] / args.batch_size / 1e12
        precision = "fp32" if name == "reference" else trainers[name].cfg.train.precision
        peak = peak_tflops(device_name(device), precision)  # the variant's own precision's peak
        s["precision"], s["peak_fraction"] = precision, (s["tflop_per_s"] / peak if peak else None)
        s["graph"] = graph_status(trainers[name]) if name in trainers else None
        s["peak_memory_bytes"] = peak_bytes.get(name)
    print_table("data pipeline alone (3 augmented views per image)", pipe)
    print(f"  per core: reference uses {workers} worker process(es), okd {torch.get_num_threads()} thread(s) "
          f"of the training process")
    print_table("full training step incl. data (img/s)", train)
    speedup = train[fast]["ratio_to_reference"]
    fastest = max((v for v in train if v != "reference"), key=lambda v: train[v]["median_img_per_s"])
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "batch_size": args.batch_size, "device": str(device),
            "device_name": device_name(device), "torch": torch.__version__, "step_flops": flops,
            "threads": torch.get_num_threads(), "reference_workers": workers, "rounds": args.rounds,
            "steps": args.steps, "settle": settle, "fast_variant": fast, "fastest_variant": fastest,
            "refused_variants": refused,
            "data_pipeline": pipe, "train_step": train}, indent=1))
    print(f"step: {flops / 1e9:.1f} GFLOP per batch of {args.batch_size} ({flops / args.batch_size / 1e9:.2f} GFLOP "
          f"per image, forward + backward + temporal-mean forwards)")
    print(f"fast configuration: {fast}" + ("" if train[fast].get("graph") is None else
          f" (graph {'captured' if train[fast]['graph']['captured'] else 'NOT captured: ' + str(train[fast]['graph']['off_reason'])})"))
    print(f"fastest variant measured: {fastest} ({train[fastest]['ratio_to_reference']:.2f}x reference)")
    print(f"speedup_vs_reference={speedup:.2f}")


if __name__ == "__main__":
    main()
