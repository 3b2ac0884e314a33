"""The optimizer, its per-epoch schedule and the fp16 grad scaler (``Optimization``).

Everything here is what ``last.pt`` saves beside the weights; ``okd.step`` calls
``Optimization.step`` once per batch with the step's device-side skip flag.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List

import torch

from .config import Config
from .methods import Method


@dataclass
class Optimization:
    """SGD, its per-epoch schedule and the fp16 grad scaler: what ``last.pt`` saves beside the weights.

    The SGD is the fused kernel (one launch for all parameters; it also takes the
    device-side skip flag), with the learning rate a device tensor that the
    schedule updates in place. A method's parameter group may carry ``lr_scale``
    (its learning rate relative to ``optim.lr``: SwitOKD's student) and ``hold``,
    a 0-dim device tensor the method sets during its forward: 1.0 leaves the
    group's weights and momentum exactly as they were for that step (SwitOKD's
    paused teacher), decided on the device, so a CUDA graph replays it.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    holds: List = dataclasses.field(default_factory=list)  # (hold flag, the group's params) per held group

    @classmethod
    def build(cls, cfg: Config, method: Method, device: torch.device) -> "Optimization":
        o, s = cfg.optim, cfg.schedule
        groups, holds = [], []
        for group in method.parameter_groups():
            group = dict(group)
            if "lr_scale" in group:
                group["lr"] = o.lr * group.pop("lr_scale")
            if "hold" in group:  # kept outside the optimizer: its state_dict holds numbers only
                holds.append((group.pop("hold"), list(group["params"])))
            groups.append(group)
        optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                                    nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay, fused=True)
        for group in optimizer.param_groups:  # one device tensor per group, before the schedule reads it
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if s.name == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
        else:  # stepped once per epoch, after it; constant = no milestones
            milestones = s.milestones if s.name == "multistep" else []
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=s.gamma)
        optimization = cls(optimizer, scheduler,
                           torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"), holds)
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
        for group in optimizer["param_groups"]:  # plain floats in the file (older files have them)
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
        """The optimizer step, not applied where ``skip`` (a 0-dim float on the device) is 1; a held
        group keeps its weights and momentum where its ``hold`` flag is 1."""
        if not self.holds:
            return self._step(skip)
        kept = [(hold, [(t, t.clone()) for p in params for t in (p, *self._momentum(p))])
                for hold, params in self.holds]
        self._step(skip)
        with torch.no_grad():
            for hold, pairs in kept:
                for now, before in pairs:
                    now.copy_(torch.where(hold > 0, before, now))

    def _momentum(self, p: torch.Tensor) -> List[torch.Tensor]:
        buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
        return [] if buf is None else [buf]

    def _step(self, skip: torch.Tensor) -> None:
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
