"""Per-device defaults: what ``auto`` (or null) means for the speed settings on this machine.

The config says what the user asked for; ``resolve_auto`` returns the copy the
run uses, with every automatic choice made for the device, and a line for the
log. Choices (measured with ``benchmarks/throughput.py``, see the README):

* CUDA, one process: bf16 autocast (where the GPU has bf16), channels_last,
  PCL's fused views, batched branches and the whole step as a CUDA graph.
  Under torchrun the graph is off (DDP's collectives), the rest stays. These
  are design choices, not yet measurements: no GPU has run okd's benchmark so
  far, and the first ``bench.json`` of ``benchmarks/gpu_check.sh`` (every
  combination of fused views and batched branches, with and without the graph)
  is what they are to be set from.
* CPU: channels_last (1.3x on an Intel Xeon with AVX-512); fused views and
  batched branches off (slower there). bf16 only where the CPU computes it
  natively (AVX-512 BF16 or AMX) *and* a short probe measures it faster than
  fp32 on this CPU: it was 1.6x faster on an AMD EPYC with AVX-512 BF16, 0.7x
  on an Intel Xeon with AVX-512 BF16 and 0.1x on AVX2-only CPUs. The probe's
  verdict is cached per CPU model, torch version and thread count in
  ``~/.cache/okd`` (``$OKD_CACHE``), so a machine always chooses the same.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from .config import Config
from .distributed import DistInfo

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 clearly: a close call is not worth the rounding


def cpu_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def cpu_flags() -> set:
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def device_name(device: torch.device) -> str:
    """The name torch reports for a CUDA device, else the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


# Dense peak TFLOP/s from the vendors' data sheets (tensor cores for bf16/fp16; fp32 without TF32),
# matched by a substring of the name torch reports; the first match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM / HBM3
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def peak_tflops(name: str, precision: str) -> Optional[float]:
    """The device's dense peak for ``precision`` if okd knows the device, else None."""
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks.get(precision)
    return None


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & set(BF16_FLAGS))


def cache_dir() -> Path:
    return Path(os.environ.get("OKD_CACHE") or Path.home() / ".cache" / "okd")


def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a small ResNet step on this CPU (cached; see the module docstring)."""
    threads = torch.get_num_threads()
    key = f"{cpu_name()} | torch {torch.__version__} | threads {threads}"
    path = cache_dir() / "cpu_bf16_probe.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    speedup = _probe_bf16()
    cached[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # an unwritable cache only means probing again next time
    return speedup


def _probe_bf16() -> float:
    """About half a second: forward + backward of a CIFAR ResNet-like stack, fp32 and bf16 interleaved."""
    rng_state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    layers: List[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    for cin, cout, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                   nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), generator=gen)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: oneDNN primitive creation
    times = {False: [], True: []}
    for _ in range(3):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    torch.set_rng_state(rng_state)
    return sorted(times[False])[1] / sorted(times[True])[1]


def resolve_auto(cfg: Config, device: torch.device, dist: DistInfo = DistInfo()) -> Tuple[Config, List[str]]:
    """(the config with every automatic choice made for ``device``, what was chosen for the log)."""
    run = copy.deepcopy(cfg)
    t, cuda = run.train, device.type == "cuda"
    notes = []
    if t.precision == "auto":
        if cuda:
            t.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif cpu_has_native_bf16():
            speedup = cpu_bf16_speedup()
            t.precision = "bf16" if speedup >= PROBE_MIN_SPEEDUP else "fp32"
            notes.append(f"bf16/fp32 speed {speedup:.2f}x on this CPU")
        else:
            t.precision = "fp32"
    if t.channels_last is None:
        t.channels_last = True
    if t.batched_branches is None:
        t.batched_branches = cuda and not t.sync_bn  # SyncBatchNorm is not batched
    if getattr(run.method, "fused_views", False) is None:
        run.method.fused_views = cuda
    if t.cuda_graphs is None:
        t.cuda_graphs = cuda and not dist.enabled
    chosen = [f"precision {t.precision}", f"channels_last {t.channels_last}", f"batched_branches {t.batched_branches}",
              f"cuda_graphs {t.cuda_graphs}"]
    if hasattr(run.method, "fused_views"):
        chosen.append(f"method.fused_views {run.method.fused_views}")
    return run, [f"device defaults: {', '.join(chosen)}" + (f" ({'; '.join(notes)})" if notes else "")]
