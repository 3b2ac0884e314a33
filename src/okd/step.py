"""One training step (``TrainStep``): forward, loss, backward, optimizer, bookkeeping.

The step calls the method (through DDP / ``torch.compile`` when configured),
sums its weighted terms into the loss, runs backward, applies the optimizer
(``okd.optim``) and ``method.after_step``, and adds the terms to the
``LossMeter``; it returns the loss as a device tensor.

No host synchronisation inside the step: whether the loss was finite is
recorded on the device (``okd.sync.StepHealth``) and decides there whether the
fused SGD applies the step (its ``found_inf`` input, as AMP's scaler uses it)
and whether the temporal mean and the loss sums take it; the host reads it at
sync points (``okd.sync.SyncPolicy``). Learning rate, the distillation ramp-up
(``method.kd_scale``) and the temporal-mean decay are device tensors too, so the
whole step can be one CUDA graph (``okd.cuda_graph``) replayed across epochs.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .config import Config
from .distributed import DistInfo
from .loss_meter import LossMeter
from .methods import Method, total_loss
from .optim import Optimization
from .run_state import RunState
from .sync import StepHealth

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def training_module(method: Method, cfg: Config, device: torch.device, dist: DistInfo) -> torch.nn.Module:
    """What the step calls: the method, under DDP with torchrun, compiled with ``train.compile``."""
    module = method
    if dist.enabled:
        # the temporal mean has no trainable parameters, so DDP leaves it alone;
        # buffers are averaged once per epoch instead of broadcast every step
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel.__init__).parameters
                          else {"broadcast_buffers": False})  # the older name
        module = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                         **no_buffer_sync)
    return torch.compile(module) if cfg.train.compile else module


def use_cuda_graphs(cfg: Config, device: torch.device, dist: DistInfo, log) -> bool:
    """Whether the step runs as a CUDA graph (``train.cuda_graphs``, resolved per device by ``okd.devices``)."""
    if not cfg.train.cuda_graphs or device.type != "cuda":
        return False
    if dist.enabled:
        log.info("cuda graphs off under torchrun (DDP's collectives); the step runs eagerly")
        return False
    return True


class TrainStep:
    """``step(views, labels)``: one optimizer step on a batch; the loss, on the device.

    ``batch_size`` is a full batch's size in this process (a CUDA graph replays full batches only).
    """

    def __init__(self, module: torch.nn.Module, method: Method, optimization: Optimization, meter: LossMeter,
                 health: StepHealth, cfg: Config, device: torch.device, batch_size: Optional[int] = None):
        self.module, self.method, self.opt, self.meter, self.health = module, method, optimization, meter, health
        self.batch_size = batch_size
        self.counter = torch.zeros((), dtype=torch.int64, device=device)  # the global step index, on the device
        self.names: List[str] = []  # "total" and the method's terms, once a step has run
        dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
        # no autocast weight cache: a CUDA graph must recompute the casts on every replay
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)) if dtype \
            else nullcontext

    def start(self, state: RunState) -> None:
        """Point the device step counter at ``state.step`` (outside any graph)."""
        self.counter.fill_(state.step)

    def __call__(self, views: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            terms = self.module(views, labels)  # the method's forward_train
        loss = total_loss(terms)
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.opt.scaler.scale(loss).backward()
        self.names = ["total", *terms]
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
        skip = self.health.record(values, self.counter)
        self.opt.step(skip)
        self.method.after_step(self.counter, 1.0 - skip)
        self.meter.add(self.names, values, labels.numel(), skip)
        self.counter.add_(1)
        return loss.detach()

    def state_tensors(self) -> Dict[str, List[torch.Tensor]]:
        """Every tensor a step changes in place, by group (weights and temporal mean, BatchNorm
        statistics, momentum and scaler, loss sums, counters): what a CUDA graph's check of one
        replay saves and restores."""
        return {"parameters": list(self.method.parameters()), "buffers": list(self.method.buffers()),
                "optimizer": self.opt.state_tensors(), "loss sums": self.meter.state_tensors(),
                "counters": [self.counter, *self.health.state_tensors()]}
