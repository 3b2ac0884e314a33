"""One optimizer step, and the pieces it needs: the optimizer, the schedule, mixed precision.

``TrainStep`` runs forward (through DDP / ``torch.compile`` when configured),
sums the method's weighted terms into the loss, runs backward, applies the
non-finite policy and then the optimizer and ``method.after_step``. It returns
a ``StepResult``.

Host synchronisation: the one per-step read from the device is
``read_step_flags`` (the non-finite flag, and whether any rank saw a stop
signal). Everything else the step produces stays on the device until a log,
checkpoint or epoch boundary reads it.
"""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .config import Config
from .data import Batch
from .distributed import DistInfo
from .errors import OkdError
from .methods import Method, total_loss
from .run_state import RunState

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Optimization:
    """SGD, its per-epoch schedule and the fp16 grad scaler: what ``last.pt`` saves beside the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @classmethod
    def build(cls, cfg: Config, method: Method, device: torch.device) -> "Optimization":
        o, s = cfg.optim, cfg.schedule
        optimizer = torch.optim.SGD(method.parameter_groups(), lr=o.lr, momentum=o.momentum,
                                    nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
        if s.name == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
        else:  # stepped once per epoch, after it; constant = no milestones
            milestones = s.milestones if s.name == "multistep" else []
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=s.gamma)
        return cls(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, blob: Dict) -> None:
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])


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


@dataclass
class StepResult:
    loss: torch.Tensor  # the total, detached, on the device
    terms: Dict[str, torch.Tensor]  # the method's weighted terms, detached, on the device
    ok: bool  # the optimizer step was taken (the loss was finite on every rank)
    stop: bool  # a stop signal arrived on some rank


def read_step_flags(values: torch.Tensor, stop_requested: bool) -> Tuple[bool, bool]:
    """(any value non-finite, any rank asked to stop), agreed by every rank: the step's one host sync."""
    flags = torch.stack([(~torch.isfinite(values)).any().float(),
                         torch.tensor(float(stop_requested), device=values.device)])
    bad, stop = distributed.all_reduce_max(flags).tolist()
    return bool(bad), bool(stop)


class TrainStep:
    def __init__(self, module: torch.nn.Module, method: Method, optimization: Optimization, cfg: Config,
                 device: torch.device, log):
        self.module, self.method, self.opt, self.log = module, method, optimization, log
        self.nonfinite, self.max_skipped = cfg.train.nonfinite, cfg.train.max_skipped_steps
        dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

    def __call__(self, batch: Batch, epoch: int, state: RunState, stop_requested: bool) -> StepResult:
        with self.autocast():
            terms = self.module(batch.views, batch.labels, epoch)
        loss = total_loss(terms)
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.opt.scaler.scale(loss).backward()
        terms = {k: v.detach() for k, v in terms.items()}
        values = torch.stack([loss.detach().float(), *(v.float() for v in terms.values())])
        bad, stop = read_step_flags(values, stop_requested)
        if bad:
            self.skip(values, list(terms), epoch, batch, state)
        else:
            self.opt.scaler.step(self.opt.optimizer)
            self.opt.scaler.update()
            self.method.after_step(state.step)
        return StepResult(loss.detach(), terms, not bad, stop)

    def skip(self, values: torch.Tensor, names, epoch: int, batch: Batch, state: RunState) -> None:
        """The non-finite policy: stop the run (the default), or skip the step up to a limit."""
        bad = [n for n, v in zip(["total", *names], values.tolist()) if not math.isfinite(v)] or ["(on another rank)"]
        where = (f"non-finite loss at step {state.step + 1} (epoch {epoch + 1}, batch {batch.index + 1}) "
                 f"in term(s) {', '.join(bad)}")
        if self.nonfinite == "stop" or state.skipped_steps >= self.max_skipped:
            raise OkdError(f"{where}; the last good checkpoint is kept. Lower optim.lr, try "
                           f"train.precision=fp32, or set train.nonfinite=skip")
        state.skipped_steps += 1
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.log.info(f"{where}: step skipped ({state.skipped_steps}/{self.max_skipped})")
