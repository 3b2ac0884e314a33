"""One optimizer step, and the pieces it needs: the optimizer, the schedule, mixed precision.

``TrainStep`` runs forward (through DDP / ``torch.compile`` when configured),
sums the method's weighted terms into the loss, runs backward, applies the
optimizer and ``method.after_step``, and adds the step's terms to the
``LossMeter``; it returns the loss as a device tensor.

No host synchronisation inside the step. Everything the step decides stays on
the device: whether the loss was finite (``StepHealth``), which decides on the
device whether the fused SGD applies the step (its ``found_inf`` input, as
AMP's scaler uses it) and whether the temporal mean and the loss sums take it.
The host learns about non-finite steps, and the ranks agree on a stop signal,
only at sync points (``TrainStep.check``: every ``train.sync_every`` steps, at
checkpoints and at the end of an epoch). Learning rate, ramp-up weight and the
temporal-mean decay are device tensors too, so the whole step can be one CUDA
graph (``okd.cuda_graph``) replayed across epochs.
"""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .config import Config
from .distributed import DistInfo
from .errors import OkdError
from .methods import Method, total_loss
from .run_state import LossMeter, RunState

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Optimization:
    """SGD, its per-epoch schedule and the fp16 grad scaler: what ``last.pt`` saves beside the weights.

    The SGD is the fused kernel (one launch for all parameters; it also takes the
    device-side skip flag), with the learning rate a device tensor that the
    schedule updates in place.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @classmethod
    def build(cls, cfg: Config, method: Method, device: torch.device) -> "Optimization":
        o, s = cfg.optim, cfg.schedule
        optimizer = torch.optim.SGD(method.parameter_groups(), lr=o.lr, momentum=o.momentum,
                                    nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay, fused=True)
        for group in optimizer.param_groups:  # one device tensor per group, before the schedule reads it
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if s.name == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
        else:  # stepped once per epoch, after it; constant = no milestones
            milestones = s.milestones if s.name == "multistep" else []
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=s.gamma)
        optimization = cls(optimizer, scheduler,
                           torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"))
        optimization.prepare_state()
        return optimization

    def prepare_state(self) -> None:
        """Fused SGD with a device lr, and a momentum buffer in its parameter's memory layout.

        Zero buffers make the first step the same as SGD's (buf = grad, dampening 0)
        and let a skipped first step leave them valid: the fused kernel's own
        first-step buffers are uninitialised memory until a step is applied.
        A loaded buffer whose strides differ from its parameter's (a run resumed with
        the other ``train.channels_last``) is copied into the parameter's layout: the
        fused kernel walks both as flat memory, so a mismatch silently mixes up the
        elements on CPU (and raises on CUDA).
        """
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = True, None
            if group["momentum"] > 0:
                for p in group["params"]:
                    state = self.optimizer.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    elif buf.stride() != p.stride():
                        state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(buf)

    def state_tensors(self) -> List[torch.Tensor]:
        """The tensors a step changes in place: momentum buffers and the fp16 scaler's scale and tracker."""
        tensors = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        if self.scaler.is_enabled() and getattr(self.scaler, "_scale", None) is not None:
            tensors += [self.scaler._scale, self.scaler._growth_tracker]
        return tensors

    def reset_step_state(self) -> None:
        """Forget a step interrupted half-way (a failed graph capture): the scaler's per-step stage
        (UNSCALED after ``unscale_``) and the attributes the scaler or ``step`` hand the optimizer."""
        if self.scaler.is_enabled():
            self.scaler._per_optimizer_states.clear()  # a defaultdict: the next step starts READY
        for name in ("found_inf", "grad_scale"):
            self.optimizer.__dict__.pop(name, None)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> Dict:
        optimizer = self.optimizer.state_dict()
        for group in optimizer["param_groups"]:  # plain floats in the file, as before
            group["lr"] = float(group["lr"])
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, blob: Dict) -> None:
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(blob["optimizer"])
        for group, lr in zip(self.optimizer.param_groups, lrs):  # keep the device tensors a graph reads
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        self.scheduler.load_state_dict(blob["scheduler"])
        if blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        self.prepare_state()

    def step(self, skip: torch.Tensor) -> None:
        """The optimizer step, not applied where ``skip`` (a 0-dim float on the device) is 1."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            # the scaler skips on its own inf/nan gradients; add ours to its flag
            for found in self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
                torch.maximum(found, skip.to(found.device), out=found)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        self.optimizer.found_inf = skip
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf


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


class StepHealth:
    """Non-finite steps since the last check, counted on the device.

    ``record`` returns the step's skip flag (1.0: some value non-finite on some
    rank; the all-reduce keeps every rank's decision the same without a host
    read) and keeps the first bad step's index and values for the message.
    """

    def __init__(self, device: torch.device, dist: DistInfo):
        self.dist = dist
        self.count = torch.zeros((), device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_values: Optional[torch.Tensor] = None

    def record(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        bad = (~torch.isfinite(values)).any().float()
        if self.dist.enabled:
            bad = distributed.all_reduce_max(bad)
        first = (self.count == 0) & (bad > 0)
        if self.first_values is None:
            self.first_values = torch.zeros_like(values)
        self.first_step.copy_(torch.where(first, step, self.first_step))
        self.first_values.copy_(torch.where(first, values, self.first_values))
        self.count.add_(bad)
        return bad

    def reset(self) -> None:
        self.count.zero_()
        self.first_step.fill_(-1)


class TrainStep:
    def __init__(self, module: torch.nn.Module, method: Method, optimization: Optimization, meter: LossMeter,
                 cfg: Config, device: torch.device, log, dist: DistInfo = DistInfo()):
        self.module, self.method, self.opt, self.meter, self.log = module, method, optimization, meter, log
        self.nonfinite, self.max_skipped = cfg.train.nonfinite, cfg.train.max_skipped_steps
        self.dist = dist
        self.health = StepHealth(device, dist)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)  # the global step index, on the device
        self.names: List[str] = []
        dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
        # no autocast weight cache: a CUDA graph must recompute the casts on every replay
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)) if dtype \
            else nullcontext

    def start(self, state: RunState) -> None:
        """Point the device step counter at ``state.step`` (outside any graph)."""
        self.counter.fill_(state.step)

    def __call__(self, views: List[torch.Tensor], labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Forward, backward, optimizer, temporal mean and loss sums; the loss, on the device."""
        # the epoch's ramp-up weight is filled here, outside the module: torch.compile must not see
        # the Python int (its guard would recompile every epoch), and a graph capture must not record it
        self.method.set_epoch(epoch)
        with self.autocast():
            terms = self.module(views, labels, epoch)
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
        health = [self.health.count, self.health.first_step]
        health += [self.health.first_values] if self.health.first_values is not None else []
        return {"parameters": list(self.method.parameters()), "buffers": list(self.method.buffers()),
                "optimizer": self.opt.state_tensors(), "loss sums": self.meter.state_tensors(),
                "counters": [self.counter, *health]}

    def check(self, state: RunState, epoch: int, stop_requested: bool) -> bool:
        """The sync point: apply the non-finite policy to the steps since the last one; any rank asked to stop."""
        flags = torch.stack([self.health.count, self.health.first_step.float(),
                             torch.tensor(float(stop_requested), device=self.counter.device)])
        if self.dist.enabled:
            flags = distributed.all_reduce_max(flags)
        bad, first, stop = flags.tolist()
        if bad:
            self.skip(int(bad), int(first), state, epoch)
            self.health.reset()
        return bool(stop)

    def skip(self, bad: int, first: int, state: RunState, epoch: int) -> None:
        """The non-finite policy: stop the run (the default), or count skipped steps up to a limit."""
        values = self.health.first_values.tolist()
        names = [n for n, v in zip(self.names, values) if not math.isfinite(v)] or ["(on another rank)"]
        batch = first - (state.step - state.batch_in_epoch)  # steps of this epoch before the first bad one
        where = (f"non-finite loss at step {first + 1} (epoch {epoch + 1}, batch {batch + 1}) "
                 f"in term(s) {', '.join(names)}")
        more = f" and {bad - 1} later step(s)" if bad > 1 else ""
        if self.nonfinite == "stop" or state.skipped_steps + bad > self.max_skipped:
            raise OkdError(f"{where}{more}; the last good checkpoint is kept. Lower optim.lr, try "
                           f"train.precision=fp32, or set train.nonfinite=skip")
        state.skipped_steps += bad
        self.log.info(f"{where}{more}: not applied ({state.skipped_steps}/{self.max_skipped} skipped)")

