"""MCL: Mutual Contrastive Learning (Yang, An, Cai, Xu, AAAI 2022), docs/methods.md §13.

m independent networks (a cohort may mix backbones) on one view; each has an
embedding head v = l2norm(W2 relu(W1 h)) (128-d) on its pooled feature h,
used in training only. With S^{ab} = V_a V_b^T / tau over the batch and the
supervised contrastive loss l (positives: the other images of the same class,
the anchor itself excluded from both sides),

  L = sum_a CE(z_a, y) + w(e) [ alpha sum_a l(S^{aa})                          (VCL)
                               + beta sum_{a != b} l(S^{ab})                   (ICL)
                               + gamma sum_{a != b} KD_T(S^{aa} <- sg S^{bb})  (soft VCL)
                               + lambda sum_{a != b} KD_T(S^{ab} <- sg S^{ba}) ] (soft ICL)

the soft terms matching each anchor's whole row of similarities (a
distribution over the batch) at temperature T with T^2. Negatives are the
batch (no memory bank, as the authors' CIFAR code). Reported (the code's rule,
labelled): the best network at each evaluation; network 1 (single-network
protocol) beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import kd_loss, logit_mean
from ..models import IndependentNets, cohort_specs
from . import METHODS
from .base import IndependentNetworksMethod, KDOptions, Summary, require


class EmbeddingHead(nn.Module):
    """Linear-ReLU-Linear to ``dim``, then l2-normalised (the MCL code's head)."""

    def __init__(self, feature_dim: int, dim: int = 128):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(feature_dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(feature.float()), dim=1)


def similarities(anchor: torch.Tensor, contrast: torch.Tensor, tau: float) -> torch.Tensor:
    """S_ik = v_i . u_k / tau (rows: anchors)."""
    return anchor @ contrast.t() / tau


def sup_contrastive(logits: torch.Tensor, labels: torch.Tensor, same_instance: bool = False) -> torch.Tensor:
    """Supervised contrastive loss of similarity rows ``logits`` (B x B, anchor i against contrast k).

    l_i = -(1/|P_i|) sum_{p in P_i} [S_ip - log sum_{k != i} exp(S_ik)], P_i = {p != i: y_p = y_i}; the mean over
    anchors with at least one positive. ``same_instance``: column i (the other network's view of the anchor's
    own image) counts as a positive and in the denominator (the paper's ICL; the code drops it).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    same = labels.view(-1, 1) == labels.view(1, -1)
    positives = (same | eye) if same_instance else (same & ~eye)
    kept = torch.ones_like(eye) if same_instance else ~eye
    log_prob = logits - torch.logsumexp(logits.masked_fill(~kept, float("-inf")), dim=1, keepdim=True)
    count = positives.sum(1)
    per_anchor = -(log_prob * positives).sum(1) / count.clamp_min(1)
    valid = (count > 0).to(per_anchor.dtype)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1)


def mcl_terms(embeddings: List[torch.Tensor], labels: torch.Tensor, tau: float, temperature: float,
              same_instance: bool = False) -> Dict[str, torch.Tensor]:
    """The four unweighted MCL sums (vcl, icl, soft_vcl, soft_icl) over m networks' embeddings."""
    m = len(embeddings)
    S = [[similarities(embeddings[a], embeddings[b], tau) for b in range(m)] for a in range(m)]
    pairs = [(a, b) for a in range(m) for b in range(m) if a != b]
    return {
        "vcl": sum(sup_contrastive(S[a][a], labels) for a in range(m)),
        "icl": sum(sup_contrastive(S[a][b], labels, same_instance) for a, b in pairs),
        "soft_vcl": sum(kd_loss(S[a][a], S[b][b].detach(), temperature) for a, b in pairs),
        "soft_icl": sum(kd_loss(S[a][b], S[b][a].detach(), temperature) for a, b in pairs),
    }


@METHODS.register("mcl", title="MCL")
class MCL(IndependentNetworksMethod):
    # main_cifar.py: lr 0.1 x (1 + cos(pi e / 300)) / 2 at each epoch; every batch 64 classes x 2 images
    # (MPerClassSampler(m=2), 390 batches an epoch: okd.data.sampling)
    recipe = {"schedule.name": "cosine", "data.sampler": "m_per_class"}
    @dataclass
    class Options(KDOptions):
        temperature: float = 3.0  # T of the soft terms
        rampup_epochs: int = 0
        num_networks: int = 2
        tau: float = 0.1  # similarity temperature (the code's current default; its logged runs used 0.07)
        embed_dim: int = 128
        vcl_weight: float = 0.1  # alpha
        icl_weight: float = 0.1  # beta
        soft_vcl_weight: float = 1.0  # gamma
        soft_icl_weight: float = 1.0  # lambda
        icl_same_instance: bool = False  # true: the other network's view of the anchor is an ICL positive

        def check(self) -> None:
            require(self.tau > 0, "mcl", "tau", "> 0", self.tau)
            require(self.embed_dim > 0, "mcl", "embed_dim", "> 0", self.embed_dim)
            for key in ("vcl_weight", "icl_weight", "soft_vcl_weight", "soft_icl_weight"):
                require(getattr(self, key) >= 0, "mcl", key, ">= 0", getattr(self, key))
            super().check()

    def __init__(self, spec, num_classes: int, options: "MCL.Options"):
        super().__init__(spec, num_classes, options)
        specs = cohort_specs(spec, options.num_networks)
        self.nets = IndependentNets(spec, options.num_networks)
        self.heads = nn.ModuleList([EmbeddingHead(s.feature_dim, options.embed_dim) for s in specs])
        self.register_buffer("reported_index", torch.zeros((), dtype=torch.int64))

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt = self.options
        outputs = [net.branch(net.trunk(views[0])) for net in self.nets.nets]
        embeddings = [head(o.feature) for head, o in zip(self.heads, outputs)]
        raw = mcl_terms(embeddings, labels, opt.tau, opt.temperature, opt.icl_same_instance)
        w = self.kd_scale
        return {"ce": sum(F.cross_entropy(o.logits, labels) for o in outputs),
                "vcl": w * opt.vcl_weight * raw["vcl"], "icl": w * opt.icl_weight * raw["icl"],
                "soft_vcl": w * opt.soft_vcl_weight * raw["soft_vcl"],
                "soft_icl": w * opt.soft_icl_weight * raw["soft_icl"]}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.nets(images)
        return {**{f"net{i + 1}": z for i, z in enumerate(logits)}, "ensemble": logit_mean(logits)}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        m = len(self.nets)
        values = [acc[f"net{i + 1}"] for i in range(m)]
        best = max(range(m), key=lambda i: values[i])
        self.reported_index.fill_(best)
        name = (lambda i: f"network {i + 1} ({self.backbones[i]})") if self.heterogeneous else \
            (lambda i: f"network {i + 1}")
        out = [Summary("reported", f"best network, now {name(best)} (MCL code's rule)", values[best]),
               Summary("net1", f"{name(0)} (single-network protocol)", values[0])]
        if self.heterogeneous:
            out += [Summary(f"net{i + 1}", name(i), values[i]) for i in range(1, m)]
        else:
            out.append(Summary("mean_net", "mean over networks", sum(values) / m))
        return [*out, Summary("ensemble", "logit-mean ensemble", acc["ensemble"])]

    @property
    def deployable_backbone(self) -> str:
        return self.backbones[int(self.reported_index)] if len(self.backbones) > 1 else self.backbones[0]

    def deployable_state_dict(self):
        return self.nets.nets[int(self.reported_index)].state_dict()
