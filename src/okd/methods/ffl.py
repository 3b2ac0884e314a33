"""FFL-S: Feature Fusion Learning, shared-trunk variant (Kim et al., ICPR 2020), docs/methods.md §6.

m branches share the trunk. A fusion module concatenates the branches' last
feature maps (m C channels), applies depthwise 3x3 conv + BN + ReLU, pointwise
1x1 conv (m C -> C) + BN + ReLU, global average pooling and an FC, giving the
fused logits z_f. With z_bar the mean of the branch logits:

  L = sum_j CE(z_j, y) + CE(z_f, y)
      + w(e) [ sum_j KD_T(z_j <- sg(z_f)) + KD_T(z_f <- sg(z_bar)) ]

T = 3, 80-epoch ramp-up, detached targets (official code). The fusion module
has its own weight decay (1e-5 in the official code; the network uses
``optim.weight_decay``). Reported: branch 1; the fused classifier is logged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss, logit_mean
from ..models import MultiBranchNet
from . import METHODS
from .base import KDOptions, SharedTrunkMethod, require


class FusionModule(nn.Module):
    def __init__(self, channels: int, num_branches: int, num_classes: int):
        super().__init__()
        wide = channels * num_branches
        self.depthwise = nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False)
        self.bn1 = nn.BatchNorm2d(wide)
        self.pointwise = nn.Conv2d(wide, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(list(maps), dim=1)
        x = F.relu(self.bn1(self.depthwise(x)))
        x = F.relu(self.bn2(self.pointwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


def ffl_kd(logits: Sequence[torch.Tensor], fused: torch.Tensor, temperature: float):
    """(fused -> branches, branch mean -> fused), targets detached."""
    ensemble_kd = sum(kd_loss(z, fused.detach(), temperature) for z in logits)
    mutual_kd = kd_loss(fused, logit_mean(logits).detach(), temperature)
    return ensemble_kd, mutual_kd


@METHODS.register("ffl", "ffl_s", title="FFL-S")
class FFL(SharedTrunkMethod):
    extra_models = {"fused": "fused classifier"}

    @dataclass
    class Options(KDOptions):
        num_branches: int = 3
        fusion_weight_decay: float = 1.0e-5

        def check(self) -> None:
            require(self.fusion_weight_decay >= 0, "ffl", "fusion_weight_decay", ">= 0", self.fusion_weight_decay)
            super().check()

    def __init__(self, spec, num_classes: int, options: "FFL.Options"):
        super().__init__(spec, num_classes, options)
        self.net = MultiBranchNet(spec, options.num_branches)
        self.fusion = FusionModule(spec.feature_dim, options.num_branches, num_classes)

    def forward_logits(self, x: torch.Tensor):
        maps = self.net.feature_maps(x)
        logits = self.net.heads(maps).logits
        return logits, self.fusion(maps)

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        logits, fused = self.forward_logits(views[0])
        ce_branches = sum(F.cross_entropy(z, labels) for z in logits)
        ce_fused = F.cross_entropy(fused, labels)
        ensemble_kd, mutual_kd = ffl_kd(logits, fused, self.options.temperature)
        w = self.kd_scale
        return {"ce_branches": ce_branches, "ce_fused": ce_fused,
                "kd_fused_to_branches": w * ensemble_kd, "kd_branches_to_fused": w * mutual_kd}

    def test_outputs(self, images: torch.Tensor):
        logits, fused = self.forward_logits(images)
        return logits, {"fused": fused, "ensemble": logit_mean(logits)}

    def parameter_groups(self) -> List[Dict]:
        return [{"params": list(self.net.parameters())},
                {"params": list(self.fusion.parameters()), "weight_decay": self.options.fusion_weight_decay}]
