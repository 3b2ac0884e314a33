"""ONE: On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018), docs/methods.md §5.

m branches share the trunk. A gate g = softmax(ReLU(BN1d(W_g GAP(h_trunk))))
weights the branches' logits into the on-the-fly teacher z_e = sum_j g_j z_j:

  L = sum_j CE(z_j, y) + CE(z_e, y) + w(e) sum_j KD_T(z_j <- sg(z_e))

T = 3, 80-epoch ramp-up; the teacher is detached as in the official code
(``detach_teacher: false`` is OKDDip's re-implementation). The gate and,
through z_e, the branches are trained by CE(z_e). Reported: branch 1 ("ONE");
the gated ensemble ("ONE-E") is logged beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss
from ..models import MultiBranchNet
from . import METHODS
from .base import KDOptions, SharedTrunkMethod


class Gate(nn.Module):
    """Per-sample branch weights from the pooled trunk output."""

    def __init__(self, trunk_channels: int, num_branches: int):
        super().__init__()
        self.fc = nn.Linear(trunk_channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)

    def forward(self, trunk_out: torch.Tensor) -> torch.Tensor:
        pooled = trunk_out.mean(dim=(2, 3))
        return F.softmax(F.relu(self.bn(self.fc(pooled))), dim=1)


def gated_ensemble(gate: torch.Tensor, logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """z_e = sum_j g_j z_j, per sample; gate is (B, m)."""
    return (gate.unsqueeze(2) * torch.stack(list(logits), dim=1)).sum(dim=1)


@METHODS.register("one", title="ONE")
class ONE(SharedTrunkMethod):
    branch_dropout = 0.5  # OKDDip's multi-branch VGG (vgg_one.py)
    extra_models = {"ensemble": "gated ensemble (ONE-E)"}

    @dataclass
    class Options(KDOptions):
        num_branches: int = 3
        detach_teacher: bool = True

    def __init__(self, spec, num_classes: int, options: "ONE.Options"):
        super().__init__(spec, num_classes, options)
        self.net = MultiBranchNet(spec, options.num_branches)
        self.gate = Gate(spec.trunk_channels, options.num_branches)

    def test_outputs(self, x: torch.Tensor):
        """(branch logits, {"ensemble": the gated ensemble z_e})."""
        shared = self.net.trunk(x)
        logits = self.net.on_shared(shared).logits
        return logits, {"ensemble": gated_ensemble(self.gate(shared), logits)}

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        logits, extra = self.test_outputs(views[0])
        ensemble = extra["ensemble"]
        teacher = ensemble.detach() if opt.detach_teacher else ensemble
        ce_branches = sum(F.cross_entropy(z, labels) for z in logits)
        ce_ensemble = F.cross_entropy(ensemble, labels)
        kd = sum(kd_loss(z, teacher, opt.temperature) for z in logits)
        return {"ce_branches": ce_branches, "ce_ensemble": ce_ensemble, "kd_ensemble": self.kd_scale * kd}
