"""OKDDip: Online KD with Diverse Peers (Chen et al., AAAI 2020), docs/methods.md §7.

A shared trunk feeds m_a auxiliary peers and one group leader (ONE-style
branches; 2 peers + 1 leader by default, so 3 branches like every method).
Two bias-free projections shared by the peers, query L_q and key L_k (d ->
d/8), give attention over peers from their pooled last feature maps h_a:

  alpha_ab = softmax_b( (L_q h_a)^T (L_k h_b) )   (b runs over all peers, b = a included)
  t_a      = sum_b alpha_ab z_b                    (peer a's target logits)

  L = sum_a CE(z_a, y) + CE(z_L, y)
      + kd_weight w(e) [ sum_a KD_T(z_a <- t_a) + KD_T(z_L <- mean_a z_a) ]

T = 3, 80-epoch ramp-up. Neither target is detached: the attention is trained
only through t_a. Reported: the group leader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss, logit_mean
from ..models import MultiBranchNet
from . import METHODS
from .base import KDOptions, Method, Summary, member_summaries, numbered_logits


class PeerAttention(nn.Module):
    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        inner = max(1, dim // reduction)
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, m, d) -> attention (B, m, m), rows sum to 1."""
        energy = self.query(features) @ self.key(features).transpose(1, 2)
        return F.softmax(energy, dim=-1)


def peer_targets(attention: torch.Tensor, logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """t[:, a] = sum_b attention[:, a, b] z_b -> (B, m, C)."""
    return attention @ torch.stack(list(logits), dim=1)


def okddip_kd(peer_logits: Sequence[torch.Tensor], targets: torch.Tensor, leader_logits: torch.Tensor,
              temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(peers <- attention targets, leader <- peer mean), nothing detached."""
    peers_kd = sum(kd_loss(z, targets[:, a], temperature) for a, z in enumerate(peer_logits))
    leader_kd = kd_loss(leader_logits, logit_mean(peer_logits), temperature)
    return peers_kd, leader_kd


@METHODS.register("okddip", title="OKDDip")
class OKDDip(Method):
    branch_dropout = 0.5  # OKDDip's vgg_GL.py

    @dataclass
    class Options(KDOptions):
        num_peers: int = 2  # auxiliary peers; the group leader is one more branch
        kd_weight: float = 1.0  # alpha of the paper

        def kd_scale(self, epoch: int) -> float:
            return self.kd_weight * super().kd_scale(epoch)

    def __init__(self, spec, num_classes: int, options: "OKDDip.Options"):
        super().__init__(spec, num_classes, options)
        self.net = MultiBranchNet(spec, options.num_peers + 1)  # the last branch is the leader
        self.attention = PeerAttention(spec.feature_dim)

    def forward_logits(self, x: torch.Tensor):
        """(peer logits, leader logits, the peers' pooled features (B, m_a, d))."""
        outs = self.net(x)
        return outs.logits[:-1], outs.logits[-1], torch.stack(outs.features[:-1], dim=1)

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        peer_logits, leader_logits, pooled = self.forward_logits(views[0])
        targets = peer_targets(self.attention(pooled), peer_logits)
        ce_peers = sum(F.cross_entropy(z, labels) for z in peer_logits)
        ce_leader = F.cross_entropy(leader_logits, labels)
        peers_kd, leader_kd = okddip_kd(peer_logits, targets, leader_logits, self.options.temperature)
        w = self.kd_scale
        return {"ce_peers": ce_peers, "ce_leader": ce_leader, "kd_peers": w * peers_kd, "kd_leader": w * leader_kd}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        peer_logits, leader_logits, _ = self.forward_logits(images)
        return {**numbered_logits("peer", peer_logits), "leader": leader_logits,
                "peer_ensemble": logit_mean(peer_logits)}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        return [Summary("reported", "group leader (reported)", acc["leader"]),
                *member_summaries(acc, "peer", self.options.num_peers, "peer")[1:],
                Summary("peer_ensemble", "peer logit-mean ensemble", acc["peer_ensemble"])]

    def deployable_state_dict(self):
        return self.net.single_state_dict(self.options.num_peers)
