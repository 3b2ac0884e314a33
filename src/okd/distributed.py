"""Multi-process training on PyTorch's own engine (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node=N main.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
okd then uses NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``) and gloo on
CPU. Semantics, chosen so that a YAML means the same thing on 1 or N processes:

* ``train.batch_size`` is the **global** batch; each process takes
  ``batch_size / world_size`` of it (an error if that does not divide).
  The learning rate is never rescaled: it is ``optim.lr`` as written.
* The epoch's order and augmentation are drawn once from (seed, epoch), the
  same on every rank; rank r trains on its slice of each global batch, so the
  ranks see different images and augmentations, and together exactly the
  images a single process would see.
* Gradients are averaged by DDP; parameters, optimizer states and the
  temporal mean therefore stay identical on every rank. BatchNorm statistics
  are per process (``train.sync_bn: true`` for SyncBatchNorm on CUDA); running
  statistics are averaged over ranks at the end of every epoch.
* Evaluation splits the test set into contiguous shards, one per rank, and
  sums the correct counts: every test image is counted exactly once.
* Only rank 0 writes logs, metrics and checkpoints.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info_from_env() -> DistInfo:
    """What torchrun (or any launcher setting the same variables) asked for."""
    env = os.environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return DistInfo()
    return DistInfo(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))


_device = torch.device("cpu")  # where collective tensors live (cuda:LOCAL_RANK under NCCL)


def init(info: DistInfo, device: torch.device) -> None:
    global _device
    if not info.enabled or dist.is_initialized():
        return
    _device = device
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (lets all ranks stop together when one cannot go on)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Floating buffers (BN running statistics) become their mean over ranks; counters rank 0's."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


@torch.no_grad()
def states_in_sync(module: nn.Module) -> bool:
    """Whether every rank holds the same parameters and buffers (checked once per epoch).

    Two float64 fingerprints per rank (the plain sum and a position-weighted sum
    of every tensor) are compared through MAX and MIN all-reduces.
    """
    if not dist.is_initialized():
        return True
    device = next(module.parameters()).device
    fingerprint = torch.zeros(2, dtype=torch.float64, device=device)
    for t in (*module.parameters(), *module.buffers()):
        flat = t.detach().reshape(-1).double()
        fingerprint[0] += flat.sum()
        fingerprint[1] += (flat * torch.arange(1, flat.numel() + 1, device=device, dtype=torch.float64)).sum()
    high, low = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))
