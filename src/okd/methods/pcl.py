"""PCL: Peer Collaborative Learning (Wu & Gong, AAAI 2021), docs/methods.md §9.

m peers share a trunk; peer j sees its own augmented view x^j. A peer-ensemble
teacher z_e = FC_e(concat(f_1..f_m)) is trained by cross-entropy only (its
features are not detached, so that CE also trains trunk and branches). A
temporal mean of the whole network provides the peer mean teachers z'_l
(EMA trunk + EMA branch l on x^l). With teachers detached:

  L = CE(z_e, y) + sum_j [ CE(z_j, y) + w(e) KD_T(z_j <- z_e)
                           + w(e) / (m-1) sum_{l != j} KD_T(z_j <- z'_l) ]

BatchNorm of the temporal mean: only parameters are averaged; the temporal
mean is forwarded in train mode on every batch (mean-teacher style), so its
running statistics are its own (``ema_buffers: own``; see ``okd.ema``).

Reported model: temporal-mean peer 1 on clean test images (the paper's
protocol); the best temporal-mean peer (the seed reproduction's) is reported
beside it, labelled.

The component ablation: ``ensemble_teacher: false`` drops CE(z_e) and the KD from z_e,
``mean_teacher: false`` the KD from the z'_l (the temporal mean is still kept and
reported), ``peer_views: false`` gives every peer and mean teacher the same one view;
each removes exactly its terms (tests/test_pcl.py). configs/ablations/pcl_*.yml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ema import BUFFER_POLICIES, ModelEMA
from ..losses import kd_loss
from ..models import MultiBranchNet
from . import METHODS
from .base import KDOptions, Method, Summary, numbered_logits, require


class PCLNet(nn.Module):
    """Multi-branch peers plus the peer-ensemble classifier: the part the EMA copies."""

    def __init__(self, spec, num_classes: int, num_peers: int):
        super().__init__()
        self.peers = MultiBranchNet(spec, num_peers)
        # over the peers' pooled features (VGG: the flattened 512-d conv output, not the hidden FC)
        self.ensemble_fc = nn.Linear(num_peers * spec.feature_dim, num_classes)
        spec.init_linear(self.ensemble_fc)

    def ensemble(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.ensemble_fc(torch.cat(features, dim=1))


@METHODS.register("pcl", title="PCL")
class PCL(Method):
    @dataclass
    class Options(KDOptions):
        num_peers: int = 3
        ema_decay: float = 0.999  # cap of the temporal-mean decay min(1 - 1/(t+1), cap)
        ema_buffers: str = "own"  # own: EMA keeps its own BN statistics; copy: copy student's
        # run the trunk once over all views (BatchNorm still per view); speed only; null: on for CUDA
        fused_views: Optional[bool] = None
        # the component ablation (the paper's component table): each switch removes one component only
        ensemble_teacher: bool = True  # false: no peer-ensemble teacher (no CE(z_e), no KD from z_e)
        mean_teacher: bool = True  # false: no peer mean teachers (no KD from z'_l; the temporal mean is kept)
        peer_views: bool = True  # false: every peer (and mean teacher) sees the same single view

        def check(self) -> None:
            require(0.0 <= self.ema_decay < 1.0, "pcl", "ema_decay", "in [0, 1)", self.ema_decay)
            require(self.ema_buffers in BUFFER_POLICIES, "pcl", "ema_buffers", "own or copy", self.ema_buffers)
            super().check()

    def __init__(self, spec, num_classes: int, options: "PCL.Options"):
        super().__init__(spec, num_classes, options)
        self.num_views = options.num_peers if options.peer_views else 1
        self.net = PCLNet(spec, num_classes, options.num_peers)
        if options.fused_views:
            self.net.peers.enable_fused_views()
        self.mean = ModelEMA(self.net, options.ema_decay, options.ema_buffers)  # a copy: fused too

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        m, T = opt.num_peers, opt.temperature
        if not opt.peer_views:  # one view for every peer: the trunk runs once, as on the same image m times
            views = list(views[:1]) * m
            out = self.net.peers(views[0])
        else:
            out = self.net.peers.forward_views(views)
        feats, logits = out
        w = self.kd_scale
        terms = {}
        if opt.ensemble_teacher:
            ensemble_logits = self.net.ensemble(feats)
            teacher = ensemble_logits.detach()
            terms["ce_ensemble"] = F.cross_entropy(ensemble_logits, labels)
        terms["ce_peers"] = sum(F.cross_entropy(z, labels) for z in logits)
        if opt.ensemble_teacher:
            terms["kd_ensemble"] = w * sum(kd_loss(z, teacher, T) for z in logits)
        if opt.mean_teacher:
            with torch.no_grad():  # mean teacher l on view l
                mean = self.mean.module.peers
                mean_logits = (mean(views[0]) if not opt.peer_views else mean.forward_views(views)).logits
            terms["kd_mean"] = w * sum(
                kd_loss(logits[j], mean_logits[l], T) for j in range(m) for l in range(m) if l != j) / (m - 1)
        return terms

    def after_step(self, step, applied=1.0) -> None:
        self.mean.update(self.net, step, applied)

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for prefix, net in (("", self.net), ("mean_", self.mean.module)):
            feats, logits = net.peers(images)
            out.update(numbered_logits(f"{prefix}peer", logits))
            if self.options.ensemble_teacher:  # without it the ensemble classifier is never trained
                out[f"{prefix}ensemble"] = net.ensemble(feats)
        return out

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        mean_peers = [acc[f"mean_peer{j + 1}"] for j in range(self.options.num_peers)]
        return [
            Summary("reported", "temporal-mean peer 1 (paper protocol)", acc["mean_peer1"]),
            Summary("best_mean_peer", "best temporal-mean peer (seed protocol)", max(mean_peers)),
        ]

    def deployable_state_dict(self):
        return self.mean.module.peers.single_state_dict(0)
