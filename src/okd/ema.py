"""Temporal mean (EMA) of a model's parameters.

Like timm's ``ModelEmaV3`` the average is kept in a deep copy of the model and
updated in place with ``torch._foreach_lerp_`` (no per-tensor Python loop).
Buffers are handled deliberately, by policy:

* ``own`` (PCL's "peer mean teacher", mean-teacher style): only parameters are
  averaged. The copy is run in train mode on every training batch, so its
  BatchNorm running statistics are its *own*, accumulated from its own
  forward passes. Buffers are never copied from the student.
* ``copy``: buffers are copied from the student after every update, for an EMA
  that is never forwarded in train mode (its BN statistics would otherwise
  stay at their initial values).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

BUFFER_POLICIES = ("own", "copy")


def ema_decay(step: int, max_decay: float) -> float:
    """alpha_t = min(1 - 1/(t+1), max_decay): a plain running mean during warm-up.

    t is the 0-based index of the optimizer step just taken, so the first
    update (t=0) copies the weights and the second averages two iterates.
    """
    return min(1.0 - 1.0 / (step + 1), max_decay)


class ModelEMA(nn.Module):
    def __init__(self, model: nn.Module, max_decay: float = 0.999, buffers: str = "own"):
        super().__init__()
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.max_decay = max_decay
        self.buffer_policy = buffers

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        decay = ema_decay(step, self.max_decay)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp(ema, p, w) = ema + w (p - ema) = decay * ema + (1 - decay) * p
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        if self.buffer_policy == "copy":
            for ema_b, b in zip(self.module.buffers(), model.buffers()):
                ema_b.copy_(b)
        return decay

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
