"""AHBF-OKD: Adaptive Hierarchy-Branch Fusion (Gong et al., AAAI 2023), docs/methods.md §16.

A shared trunk and M branches of increasing depth: branch i's last stage has
``i * aux_blocks`` more blocks (layers, for DenseNet; convs, for VGG; for
MobileNetV2 spread over its branch's three stages, lower first, the authors'
rule) than the backbone's, so branch 1, the target, is the backbone itself and
is deployed. The fusion modules are initialised by the backbone's own init
loop, as the authors' model-wide loop does.
Fusion modules merge adjacent levels recursively into teacher assistants (TAs):
TA_1 = fuse(branch 1, branch 2), TA_m = fuse(TA_{m-1}, branch m+1). A module
concatenates the two last feature maps, 1x1 conv (+bias) + BN gives the fused map F,
and per-sample weights s = softmax(relu(BN1d(Linear(GAP(F))))) mix the two
inputs' logits: z_TA = s_1 z_a + s_2 z_b. With A_0 = z_1, A_m = z_TA_m (nothing
detached, as the authors' code):

  L = sum_i CE(z_i, y) + sum_m CE(z_TA_m, y)
      + w(e) sum_{m=1}^{M-1} [ lambda2 KD_T(A_{m-1} <- z_{m+1}) + lambda1 KD_T(A_{m-1} <- A_m)
                               + lambda1 KD_T(z_{m+1} <- A_m) ]

w(e) = kd_weight * the sigmoid ramp-up over 240 epochs (the code's 1.5 x its ramp's 0.5 = 0.75). Reported:
the target branch 1 (the paper's protocol and the single network).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..losses import kd_loss
from ..models import BACKBONES, BackboneSpec
from ..models.nets import single_state_dict
from . import METHODS
from .base import KDOptions, Method, Summary, numbered_logits, require


class FusionModule(nn.Module):
    """Two levels' last maps (C_a, C_b channels) and logits -> the fused map (C_b) and the TA's logits."""

    def __init__(self, channels_a: int, channels_b: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_a + channels_b, channels_b, 1, bias=True)
        self.bn = nn.BatchNorm2d(channels_b)
        self.gate = nn.Linear(channels_b, 2)
        self.gate_bn = nn.BatchNorm1d(2)

    def weights(self, fused: torch.Tensor) -> torch.Tensor:
        """(B, 2) per-sample weights of the two inputs' logits, each row summing to 1."""
        return F.softmax(F.relu(self.gate_bn(self.gate(fused.mean(dim=(2, 3))))), dim=1)

    def forward(self, map_a, map_b, logits_a, logits_b) -> Tuple[torch.Tensor, torch.Tensor]:
        fused = self.bn(self.conv(torch.cat([map_a, map_b], dim=1)))
        s = self.weights(fused).to(logits_a.dtype)
        return fused, s[:, :1] * logits_a + s[:, 1:] * logits_b


class HierarchyBranchNet(nn.Module):
    """The trunk, M branches of increasing depth, and the M - 1 fusion modules."""

    def __init__(self, spec: BackboneSpec, num_branches: int, aux_blocks: int):
        super().__init__()
        self.trunk = spec.make_trunk()
        self.branches = nn.ModuleList([spec.deeper_branch(i, aux_blocks) for i in range(num_branches)])
        # each branch's last-map width: its classifier's input, unless hidden FC layers follow the pooling (VGG)
        channels = [b.fc.in_features if b.pool_layers == len(b.body) else spec.feature_dim for b in self.branches]
        self.fusions = nn.ModuleList([FusionModule(channels[i], channels[i + 1]) for i in range(num_branches - 1)])
        # the authors' model-wide init loop reaches the fusion modules too (Kaiming fan-out for the ResNets'
        # 1x1 convs, the backbone's Linear rule for the gates); PyTorch's default would leave those convs ~3.5x
        # smaller at 64 channels
        for fusion in self.fusions:
            spec.init_weights(fusion)

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(branch logits z_1..z_M, TA logits z_TA_1..z_TA_{M-1})."""
        shared = self.trunk(x)
        maps = [b.feature_map(shared) for b in self.branches]
        logits = [b.head(fm).logits for b, fm in zip(self.branches, maps)]
        fused, ta, tas = maps[0], logits[0], []
        for m, fusion in enumerate(self.fusions, start=1):
            fused, ta = fusion(fused, maps[m], ta, logits[m])
            tas.append(ta)
        return logits, tas


def ahbf_kd(logits: Sequence[torch.Tensor], tas: Sequence[torch.Tensor], temperature: float,
            lambda1: float, lambda2: float) -> torch.Tensor:
    """The hierarchical KD sum (before w(e)); nothing detached."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    previous = logits[0]  # A_0: the target branch
    for m, ta in enumerate(tas):
        branch = logits[m + 1]
        total = total + lambda2 * kd_loss(previous, branch, temperature) \
            + lambda1 * kd_loss(previous, ta, temperature) + lambda1 * kd_loss(branch, ta, temperature)
        previous = ta
    return total


@METHODS.register("ahbf", title="AHBF")
class AHBF(Method):
    # train_ahbf.py calls its MultiStepLR([150, 225]) at the start of each epoch, so the lr drops after
    # epochs 149 and 224 (okd's schedule steps after each epoch); otherwise §1
    recipe = {"schedule.milestones": [149, 224]}
    @dataclass
    class Options(KDOptions):
        temperature: float = 3.0
        rampup_epochs: int = 240
        num_branches: int = 4
        aux_blocks: int = 4  # extra blocks of each deeper branch over the previous one
        kd_weight: float = 0.75  # the code's kd_weight 1.5 times its ramp-up's factor 0.5
        lambda1: float = 2.0  # TA -> previous TA, TA -> its branch (the README's command)
        lambda2: float = 4.0  # branch -> previous TA

        def kd_scale(self, epoch: int) -> float:
            return self.kd_weight * super().kd_scale(epoch)

        def check(self) -> None:
            require(self.aux_blocks >= 1, "ahbf", "aux_blocks", ">= 1", self.aux_blocks)
            require(self.lambda1 >= 0 and self.lambda2 >= 0, "ahbf", "lambda1/lambda2", ">= 0",
                    (self.lambda1, self.lambda2))
            super().check()

    @classmethod
    def unsupported(cls, spec: BackboneSpec):
        """Why ``spec`` cannot carry this method's branches (None: it can)."""
        if spec.deeper_branch is None:
            deep = [n for n in BACKBONES.names() if BACKBONES.get(n)(10).deeper_branch is not None]
            return (f"method ahbf needs branches of increasing depth, which backbone {spec.name or '?'} does not "
                    f"build; pick one of {', '.join(deep)}")
        return None

    def __init__(self, spec, num_classes: int, options: "AHBF.Options"):
        reason = self.unsupported(spec)
        if reason:
            raise ConfigError(reason)
        super().__init__(spec, num_classes, options)
        self.net = HierarchyBranchNet(spec, options.num_branches, options.aux_blocks)

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        logits, tas = self.net(views[0])
        return {"ce_branches": sum(F.cross_entropy(z, labels) for z in logits),
                "ce_assistants": sum(F.cross_entropy(z, labels) for z in tas),
                "kd_hierarchy": self.kd_scale * ahbf_kd(logits, tas, opt.temperature, opt.lambda1, opt.lambda2)}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, tas = self.net(images)
        return {**numbered_logits("branch", logits), **numbered_logits("assistant", tas)}

    def diagnostic_groups(self, names) -> Dict[str, List[str]]:
        return {"branch": [n for n in names if n.startswith("branch")]}  # the assistants are fusions of them

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        M = self.options.num_branches
        return [Summary("reported", "target branch 1 (paper protocol)", acc["branch1"]),
                Summary("deepest_branch", f"deepest branch {M}", acc[f"branch{M}"]),
                Summary("last_assistant", f"teacher assistant {M - 1} (fuses all branches)", acc[f"assistant{M - 1}"])]

    def deployable_state_dict(self):
        return single_state_dict(self.net.trunk, self.net.branches[0])  # the target branch
