"""CL: Collaborative Learning with ILR sharing (Song & Chai, NeurIPS 2018), docs/methods.md §4.

m heads share the trunk (one split, as ONE). Backprop rescaling: an identity
at the branch point whose backward divides the gradient by m, so the trunk
receives the *mean* of the heads' gradients rather than their sum. With
z_bar_-h the mean of the other heads' logits:

* ``form: paper`` (default): L = sum_h [ beta CE(z_h, y)
  + (1 - beta) KD_T(z_h <- sg(z_bar_-h)) ], beta = 0.5, T = 2, no ramp-up;
* ``form: okddip`` (OKDDip's re-implementation): L = sum_h [ CE(z_h, y)
  + w(e) KD_T(z_h <- z_bar_-h) ], T = 3, 80-epoch ramp-up, target not detached.

``temperature``, ``rampup_epochs`` and ``detach_teacher`` left null take the
form's values. Reported: head 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..losses import kd_to_others_mean
from ..models import MultiBranchNet
from . import METHODS
from .base import KDOptions, SharedTrunkMethod, require

# form -> (temperature, rampup_epochs, detach_teacher)
FORMS = {"paper": (2.0, 0, True), "okddip": (3.0, 80, False)}


class GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@METHODS.register("cl", "cl_ilr", title="CL")
class CL(SharedTrunkMethod):
    branch_dropout = 0.5  # OKDDip's multi-branch VGG (vgg_one.py)

    @dataclass
    class Options(KDOptions):
        temperature: Optional[float] = None  # null: 2 (paper) / 3 (okddip)
        rampup_epochs: Optional[int] = None  # null: 0 (paper) / 80 (okddip)
        num_branches: int = 3
        form: str = "paper"  # paper | okddip
        beta: float = 0.5  # paper form: beta CE + (1 - beta) KD
        detach_teacher: Optional[bool] = None  # null: true (paper) / false (okddip)
        grad_rescale: bool = True  # backprop rescaling at the branch point

        def __post_init__(self):
            if self.form in FORMS:
                t, r, d = FORMS[self.form]
                self.temperature = t if self.temperature is None else self.temperature
                self.rampup_epochs = r if self.rampup_epochs is None else self.rampup_epochs
                self.detach_teacher = d if self.detach_teacher is None else self.detach_teacher

        def ce_coefficient(self) -> float:
            return self.beta if self.form == "paper" else 1.0

        def kd_scale(self, epoch: int) -> float:
            return (1.0 - self.beta if self.form == "paper" else 1.0) * super().kd_scale(epoch)

        def check(self) -> None:
            require(self.form in FORMS, "cl", "form", " or ".join(FORMS), self.form)
            require(0.0 <= self.beta <= 1.0, "cl", "beta", "in [0, 1]", self.beta)
            super().check()

    def __init__(self, spec, num_classes: int, options: "CL.Options"):
        super().__init__(spec, num_classes, options)
        self.net = MultiBranchNet(spec, options.num_branches)

    def head_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        shared = self.net.trunk(x)
        if self.options.grad_rescale and torch.is_grad_enabled():
            shared = GradScale.apply(shared, 1.0 / self.options.num_branches)
        return self.net.on_shared(shared).logits

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        logits = self.head_logits(views[0])
        ce = sum(F.cross_entropy(z, labels) for z in logits)
        kd = kd_to_others_mean(logits, opt.temperature, opt.detach_teacher)
        return {"ce": opt.ce_coefficient() * ce, "kd_peers": self.kd_scale * kd}
