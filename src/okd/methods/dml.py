"""DML: Deep Mutual Learning (Zhang et al., CVPR 2018), docs/methods.md §3.

m independent networks, one shared augmented view, one optimizer, simultaneous
update. Default (the recommended form): pairwise targets, detached,

  L = sum_k [ CE(z_k, y) + w(e) / (m-1) sum_{l != k} KD_T(z_k <- sg(z_l)) ]

with T = 3 and T^2 scaling (the line-of-work convention); ``temperature: 1``
is the DML paper's form. ``target: others_mean`` is OKDDip's re-implementation
(KD towards the mean of the other networks' logits, CL's loss), and
``detach_teacher: false`` its undetached targets. Reported: network 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..losses import kd_loss, kd_to_others_mean
from ..models import IndependentNets
from . import METHODS
from .base import IndependentNetworksMethod, KDOptions, require

TARGETS = ("pairwise", "others_mean")


def dml_kd(logits: Sequence[torch.Tensor], temperature: float, target: str = "pairwise",
           detach_teacher: bool = True) -> torch.Tensor:
    """The mutual term summed over networks (before the ramp-up weight)."""
    if target == "others_mean":
        return kd_to_others_mean(logits, temperature, detach_teacher)
    m = len(logits)
    teachers = [z.detach() for z in logits] if detach_teacher else list(logits)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for k in range(m):
        total = total + sum(kd_loss(logits[k], teachers[l], temperature) for l in range(m) if l != k) / (m - 1)
    return total


@METHODS.register("dml", title="DML")
class DML(IndependentNetworksMethod):
    @dataclass
    class Options(KDOptions):
        temperature: float = 3.0  # 1.0 is the DML paper's form
        rampup_epochs: int = 0  # 0: no ramp-up (DML has none)
        num_networks: int = 3
        target: str = "pairwise"  # pairwise | others_mean (OKDDip's re-implementation)
        detach_teacher: bool = True

        def check(self) -> None:
            require(self.target in TARGETS, "dml", "target", " or ".join(TARGETS), self.target)
            super().check()

    def __init__(self, spec, num_classes: int, options: "DML.Options"):
        super().__init__(spec, num_classes, options)
        self.nets = IndependentNets(spec, options.num_networks)

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        logits = self.nets(views[0])
        ce = sum(F.cross_entropy(z, labels) for z in logits)
        kd = dml_kd(logits, opt.temperature, opt.target, opt.detach_teacher)
        return {"ce": ce, "kd_mutual": self.kd_scale * kd}
