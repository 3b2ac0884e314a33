"""Temporal mean (EMA) of a model's parameters.

Like timm's ``ModelEmaV3`` the average is kept in a deep copy of the model and
updated in place with multi-tensor (``torch._foreach_*``) kernels, no
per-tensor Python loop. The decay is computed on the device from the step
index, so an update never reads the device and a CUDA graph of the training
step replays it correctly at every step.
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
    def update(self, model: nn.Module, step, applied=1.0) -> torch.Tensor:
        """Average in ``model`` after optimizer step ``step`` (an int or a device tensor);
        nothing moves where ``applied`` is 0 (a skipped step). Returns the decay used."""
        ema_params = list(self.module.parameters())
        device = ema_params[0].device
        t = torch.as_tensor(step, device=device).to(torch.float64)
        decay = torch.clamp(1.0 - 1.0 / (t + 1.0), max=self.max_decay)  # ema_decay on the device
        weight = ((1.0 - decay) * torch.as_tensor(applied, device=device)).to(ema_params[0].dtype)
        params = [p.detach() for p in model.parameters()]
        # ema + w (p - ema) = decay * ema + (1 - decay) * p
        delta = torch._foreach_sub(params, ema_params)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(ema_params, delta)
        if self.buffer_policy == "copy":
            torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))
        return decay

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
