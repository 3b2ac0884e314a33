"""CL: Collaborative Learning with ILR sharing (Song & Chai, NeurIPS 2018), spec section 4.

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
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..losses import kd_loss, sigmoid_rampup
from ..models import MultiBranchNet
from . import METHODS
from .base import Method, Summary, member_summaries, numbered_logits, require

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


def cl_kd(logits: Sequence[torch.Tensor], temperature: float, detach_teacher: bool) -> torch.Tensor:
    """sum_h KD_T(z_h <- mean_{j != h} z_j)."""
    m = len(logits)
    teachers = [z.detach() for z in logits] if detach_teacher else list(logits)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for h in range(m):
        others = torch.stack([teachers[j] for j in range(m) if j != h]).mean(0)
        total = total + kd_loss(logits[h], others, temperature)
    return total


@METHODS.register("cl", "cl_ilr")
class CL(Method):
    @dataclass
    class Options:
        num_branches: int = 3
        form: str = "paper"  # paper | okddip
        beta: float = 0.5  # paper form: beta CE + (1 - beta) KD
        temperature: Optional[float] = None  # null: 2 (paper) / 3 (okddip)
        rampup_epochs: Optional[int] = None  # null: 0 (paper) / 80 (okddip)
        detach_teacher: Optional[bool] = None  # null: true (paper) / false (okddip)
        grad_rescale: bool = True  # backprop rescaling at the branch point

        def __post_init__(self):
            if self.form in FORMS:
                t, r, d = FORMS[self.form]
                self.temperature = t if self.temperature is None else self.temperature
                self.rampup_epochs = r if self.rampup_epochs is None else self.rampup_epochs
                self.detach_teacher = d if self.detach_teacher is None else self.detach_teacher

    def __init__(self, spec, num_classes: int, options: "CL.Options"):
        super().__init__(spec, num_classes, options)
        require(options.num_branches >= 2, "cl", "num_branches", ">= 2", options.num_branches)
        require(options.form in FORMS, "cl", "form", " or ".join(FORMS), options.form)
        require(0.0 <= options.beta <= 1.0, "cl", "beta", "in [0, 1]", options.beta)
        require(options.temperature > 0, "cl", "temperature", "> 0", options.temperature)
        self.net = MultiBranchNet(spec, options.num_branches)

    def head_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        shared = self.net.trunk(x)
        if self.options.grad_rescale and torch.is_grad_enabled():
            shared = GradScale.apply(shared, 1.0 / self.options.num_branches)
        return [branch(shared)[1] for branch in self.net.branches]

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor, epoch: int):
        opt = self.options
        logits = self.head_logits(views[0])
        ce = sum(F.cross_entropy(z, labels) for z in logits)
        kd = cl_kd(logits, opt.temperature, opt.detach_teacher)
        ce_weight, kd_weight = (opt.beta, 1.0 - opt.beta) if opt.form == "paper" else (1.0, 1.0)
        loss = ce_weight * ce + kd_weight * sigmoid_rampup(epoch, opt.rampup_epochs) * kd
        return loss, {"ce": ce.detach(), "kd_peers": kd.detach()}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        _, logits = self.net(images)
        out = numbered_logits("branch", logits)
        out["ensemble"] = torch.stack(logits).mean(0)
        return out

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        return [*member_summaries(acc, "branch", self.options.num_branches, "branch"),
                Summary("ensemble", "logit-mean ensemble", acc["ensemble"])]

    def deployable_state_dict(self):
        return self.net.single_state_dict(0)
