"""KDCL: Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020), docs/methods.md §8.

m independent networks; network i sees its own augmented view of each image
("invariant collaborative learning"). The students' logits build an ensemble
teacher z_t, detached:

  L = sum_i [ CE(z_i, y) + lambda w(e) KD_T(z_i <- sg(z_t)) ]          (weighting: additive)
  L = sum_i [ (1 - lambda) CE(z_i, y) + lambda w(e) KD_T(z_i <- sg(z_t)) ]   (weighting: convex)

Teachers: ``minlogit`` (default; subtract each student's true-class logit,
then take the element-wise minimum over students: 0 at the true class, the
most confident margin elsewhere) or ``naive`` (mean of the logits). The
Linear/General variants need a held-out split and are not built. T = 3, no
ramp-up by default. Reported: network 1; the logged ensemble is the logit mean
(MinLogit needs the labels, so it is not a test-time model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..losses import kd_loss, logit_mean
from ..models import IndependentNets
from . import METHODS
from .base import IndependentNetworksMethod, KDOptions, require

TEACHERS = ("minlogit", "naive")
WEIGHTINGS = ("additive", "convex")


def minlogit_teacher(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """z_t,c = min_i (z_i,c - z_i,y)."""
    stacked = torch.stack(list(logits))  # (m, B, C)
    true_class = stacked.gather(2, labels.view(1, -1, 1).expand(stacked.shape[0], -1, 1))
    return (stacked - true_class).amin(dim=0)


def kdcl_teacher(logits: Sequence[torch.Tensor], labels: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "minlogit":
        return minlogit_teacher(logits, labels)
    return logit_mean(logits)


@METHODS.register("kdcl", title="KDCL")
class KDCL(IndependentNetworksMethod):
    @dataclass
    class Options(KDOptions):
        rampup_epochs: int = 0  # 0: no ramp-up; 80 is the line of work's optional choice
        num_networks: int = 3
        teacher: str = "minlogit"  # minlogit | naive
        kd_weight: float = 1.0  # lambda
        # additive: CE + lambda KD (the line of work's form); convex: (1 - lambda) CE + lambda KD, the only
        # public KDCL code (OKDPH's src/03_KDCL.py, lambda = alpha = 0.5: half the additive loss at lambda 1)
        weighting: str = "additive"

        def kd_scale(self, epoch: int) -> float:
            return self.kd_weight * super().kd_scale(epoch)

        def check(self) -> None:
            require(self.teacher in TEACHERS, "kdcl", "teacher", " or ".join(TEACHERS), self.teacher)
            require(self.weighting in WEIGHTINGS, "kdcl", "weighting", " or ".join(WEIGHTINGS), self.weighting)
            if self.weighting == "convex":
                require(0 <= self.kd_weight <= 1, "kdcl", "kd_weight", "in [0, 1] with weighting convex",
                        self.kd_weight)
            super().check()

    def __init__(self, spec, num_classes: int, options: "KDCL.Options"):
        super().__init__(spec, num_classes, options)
        self.num_views = options.num_networks
        self.nets = IndependentNets(spec, options.num_networks)

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        logits = self.nets.forward_views(views)
        teacher = kdcl_teacher([z.detach() for z in logits], labels, opt.teacher)
        ce = sum(F.cross_entropy(z, labels) for z in logits)
        kd = sum(kd_loss(z, teacher, opt.temperature) for z in logits)
        if opt.weighting == "convex":
            ce = (1.0 - opt.kd_weight) * ce
        return {"ce": ce, "kd_ensemble": self.kd_scale * kd}
