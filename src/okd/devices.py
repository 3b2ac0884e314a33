"""Per-device defaults: what ``auto`` (or null) means for the speed settings on this machine.

The config says what the user asked for; ``resolve_auto`` returns the copy the
run uses, with every automatic choice made for the device, and a line for the
log. Choices (measured with ``benchmarks/throughput.py``, see docs/speed.md):

* CUDA, one process: bf16 autocast (where the GPU has bf16), channels_last,
  PCL's fused views, batched branches and the whole step as a CUDA graph.
  Under torchrun the graph is off (DDP's collectives), the rest stays. These
  are design choices, not yet measurements: no GPU has run okd's benchmark so
  far, and the first ``bench.json`` of ``benchmarks/gpu_check.sh`` (every
  combination of fused views and batched branches, with and without the graph)
  is what they are to be set from.
* CPU: channels_last (1.3x on an Intel Xeon with AVX-512) unless the model has a
  convolution that oneDNN's channels_last kernels get wrong (``cpu_channels_last_hazards``:
  then NCHW, and a forced ``train.channels_last=true`` is refused in one line); fused views and
  batched branches off (slower there). bf16 only where the CPU computes it
  natively (AVX-512 BF16 or AMX) *and* a short probe measures it faster than
  fp32 on this CPU: it was 1.6x faster on an AMD EPYC with AVX-512 BF16, 0.7x
  on an Intel Xeon with AVX-512 BF16 and 0.1x on AVX2-only CPUs. The probe's
  verdict is cached per CPU model, torch version and thread count in
  ``~/.cache/okd`` (``$OKD_CACHE``), so a machine always chooses the same.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import hardware
from .config import Config
from .distributed import DistInfo
from .errors import ConfigError

PROBE_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 clearly: a close call is not worth the rounding

# oneDNN computes a strided 1x1 convolution by first copying the strided input pixels into a per-thread
# workspace ("rtus"). Its weight gradient for a channels_last (nhwc) input indexes that workspace by the
# ISA's channel block (16 on AVX-512, 8 on AVX2) instead of the layer's input channels, so with fewer input
# channels than the block it writes past the workspace (uxlfoundation/oneDNN#6035: a hang, a wrong weight
# gradient or a crash, by CPU and thread count). Measured with torch 2.14.1 on a 2-core Intel Xeon with
# AVX-512 and AMX and on a 2-core AMD EPYC Zen 4: 3, 4, 8 and 12 input channels abort the process
# (double free, SIGSEGV) on odd batches with 2 or more threads; 16 and more, 3x3 and stride 1 never did.
ONEDNN_CHANNEL_BLOCK = 16  # the widest x86 block: every CPU's kernel is safe at or above it
ONEDNN_BUG = "uxlfoundation/oneDNN#6035"


def channels_last_hazards(module: nn.Module) -> List[str]:
    """The convolutions of ``module`` that oneDNN's channels_last weight gradient gets wrong on a CPU."""
    out = []
    for name, m in module.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                and m.in_channels // m.groups < ONEDNN_CHANNEL_BLOCK):
            out.append(f"{name} (1x1, stride {m.stride[0]}, {m.in_channels // m.groups} input channels)")
    return out


def cpu_channels_last_hazards(cfg: Config) -> List[str]:
    """``channels_last_hazards`` of the run's method, built on the meta device (no memory, no RNG draw)."""
    from .methods import build_configured_method

    with torch.device("meta"):
        method = build_configured_method(cfg, cfg.model.num_classes or 10, image_size=None)
    return channels_last_hazards(method)


def resolve_auto(cfg: Config, device: torch.device, dist: DistInfo = DistInfo(),
                 hazards: Optional[Sequence[str]] = None) -> Tuple[Config, List[str]]:
    """(the config with every automatic choice made for ``device``, what was chosen for the log).

    ``hazards``: the model's convolutions that channels_last must avoid on a CPU
    (``cpu_channels_last_hazards``, computed here when not given)."""
    run = copy.deepcopy(cfg)
    t, cuda = run.train, device.type == "cuda"
    notes = []
    if t.precision == "auto":
        if cuda:
            t.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif hardware.cpu_has_native_bf16():
            speedup = hardware.cpu_bf16_speedup()
            t.precision = "bf16" if speedup >= PROBE_MIN_SPEEDUP else "fp32"
            notes.append(f"bf16/fp32 speed {speedup:.2f}x on this CPU")
        else:
            t.precision = "fp32"
    if not cuda and t.channels_last is not False:
        hazards = cpu_channels_last_hazards(run) if hazards is None else list(hazards)
        if hazards and t.channels_last:
            raise ConfigError(f"train.channels_last=true on a CPU: {cfg.model.label}'s {hazards[0]} is a "
                              f"convolution whose channels_last weight gradient oneDNN computes past its workspace "
                              f"({ONEDNN_BUG}; it kills the process on odd batches); set train.channels_last=null "
                              f"(NCHW for this model) or false")
        if t.channels_last is None:
            t.channels_last = not hazards
            if hazards:
                notes.append(f"channels_last off: {hazards[0]} hits {ONEDNN_BUG}")
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


def resolve_device(name: str, dist: DistInfo = DistInfo()) -> torch.device:
    if dist.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        # torchrun: one GPU per process
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started more processes per node than the {torch.cuda.device_count()} "
                              f"GPU(s) here; lower --nproc_per_node")
        return torch.device("cuda", dist.local_rank)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available here; use device=cpu or auto")
        if dist.enabled and ":" in name:
            raise ConfigError(f"device '{name}' under torchrun: use device=cuda (process r takes cuda:LOCAL_RANK)")
        # always indexed: torch.cuda.set_device and use_mem_pool refuse a bare "cuda"
        index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    return torch.device(name)


def set_up_device(name: str, dist: DistInfo = DistInfo()) -> torch.device:
    """``resolve_device``, then ``use_cuda_device`` on CUDA: what a training run does, for the tools
    (preflight, benchmarks, the planner's speed probe) whose figures must be the run's."""
    device = resolve_device(name, dist)
    if device.type == "cuda":
        use_cuda_device(device)
    return device


def use_cuda_device(device: torch.device) -> None:
    """Make the run's GPU (an indexed CUDA device, as ``resolve_device`` returns) the current one and let
    cuDNN pick its fastest kernels.

    Everything that uses the *current* device follows the run's: the capture stream of a
    CUDA graph, the DataLoader's pin-memory thread, NCCL, cuBLAS handles. Without it a run
    on cuda:1 (or torchrun rank 1) opens a context on GPU 0 and its graph records nothing.
    Every full batch has one shape, so cuDNN's autotuner (``cudnn.benchmark``) pays once.
    """
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
