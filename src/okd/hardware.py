"""Facts about the hardware a run is on: CPU model and flags, GPU name, data-sheet peaks, and a
measured one (whether bf16 beats fp32 on this CPU, cached per CPU model, torch and thread count in
``~/.cache/okd`` or ``$OKD_CACHE``). What okd does with them is ``okd.devices``'s."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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
