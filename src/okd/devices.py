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
from typing import List, Tuple

import torch

from . import hardware
from .config import Config
from .distributed import DistInfo
from .errors import ConfigError

PROBE_MIN_SPEEDUP = 1.15  # bf16 must beat fp32 clearly: a close call is not worth the rounding


def resolve_auto(cfg: Config, device: torch.device, dist: DistInfo = DistInfo()) -> Tuple[Config, List[str]]:
    """(the config with every automatic choice made for ``device``, what was chosen for the log)."""
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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available here; use device=cpu or auto")
        if dist.enabled:
            raise ConfigError(f"device '{name}' under torchrun: use device=cuda (process r takes cuda:LOCAL_RANK)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(name)


def use_cuda_device(device: torch.device) -> None:
    """Make the run's GPU the current one and let cuDNN pick its fastest kernels.

    Everything that uses the *current* device follows the run's: the capture stream of a
    CUDA graph, the DataLoader's pin-memory thread, NCCL, cuBLAS handles. Without it a run
    on cuda:1 (or torchrun rank 1) opens a context on GPU 0 and its graph records nothing.
    Every full batch has one shape, so cuDNN's autotuner (``cudnn.benchmark``) pays once.
    """
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
