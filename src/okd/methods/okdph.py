"""OKDPH: Online KD with Parameter Hybridization (Zhang et al., CVPR 2023), docs/methods.md §15.

m identical students (same initialisation), each on its own augmented view,
and a hybrid-weight model (HWM) on one more view: per batch, a random convex
combination of the students' weights, theta_h = sum_i r_i theta_i with
r ~ Dirichlet(1, ..., 1). The HWM's forward is functional in the students'
weights, so its cross-entropy trains student i through r_i (the paper's intent;
the authors' code copies the weights and passes no gradient: ``hybrid_grad:
false``). The teacher is the detached mean of all m + 1 models' logits:

  L = omega sum_i CE(z_i, y) + (1 - omega) CE(z_h, y) + beta w(e) sum_i KD_T(z_i <- sg(mean(z_1..z_m, z_h)))

Fusion, every ``fusion_every`` epochs (or batches): theta_i <- gamma theta_bar + (1 - gamma) theta_i with
theta_bar the students' mean (weights and BatchNorm statistics; momentum untouched), which shrinks their
spread by (1 - gamma). Reported (the code's rule, labelled): the best of the students and the
students' mean model at each evaluation; student 1 (single-network protocol) beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import ConfigError
from ..losses import kd_loss, logit_mean
from ..models import IndependentNets
from . import METHODS
from .base import IndependentNetworksMethod, KDOptions, Summary, require

HYBRIDS = ("dirichlet", "mean")
FUSION_UNITS = ("epoch", "batch")


def dirichlet_ones(m: int, device, generator=None) -> torch.Tensor:
    """r ~ Dirichlet(1, ..., 1) as normalised Exp(1) draws (graph-safe: uniform draws only)."""
    e = -torch.log(torch.rand(m, device=device, generator=generator).clamp_min(1e-12))
    return e / e.sum()


def combine(tensors: Sequence[torch.Tensor], r: torch.Tensor) -> torch.Tensor:
    """sum_i r_i * tensors[i]."""
    total = tensors[0] * r[0]
    for i in range(1, len(tensors)):
        total = total + tensors[i] * r[i]
    return total


def fuse_(students: Sequence[torch.Tensor], gamma, do=1.0) -> None:
    """theta_i <- theta_i + do * gamma * (mean - theta_i), in place (``do`` 0 leaves them exactly)."""
    mean = torch.stack([t.float() for t in students]).mean(0)
    for t in students:
        t.add_(((mean - t.float()) * (gamma * do)).to(t.dtype))


@METHODS.register("okdph", title="OKDPH")
class OKDPH(IndependentNetworksMethod):
    # src/OKDPH.py: SGD momentum 0.9 without Nesterov; on CIFAR-100 its transes give student 1 crop + flip +
    # RandomRotation(15), student 2 crop + flip + Cutout(1, 16) and the HWM crop + RandAugment; otherwise §1
    recipe = {"optim.nesterov": False,
              "data.views": ["crop+flip+rotate", "crop+flip+cutout", "crop+randaugment"]}
    identical_networks = "averages its students' weights, which needs identical networks"

    @dataclass
    class Options(KDOptions):
        temperature: float = 4.0
        rampup_epochs: int = 0
        num_networks: int = 2  # students
        omega: float = 0.8  # weight of each student's CE; the HWM's CE gets 1 - omega
        kd_weight: float = 0.8  # beta, on the KD to the mean-logit teacher
        gamma: float = 0.5  # fusion: the weight of the students' mean
        fusion_every: int = 1  # 0: no fusion
        fusion_unit: str = "epoch"  # epoch | batch
        hybrid: str = "dirichlet"  # dirichlet (the paper) | mean (the code's fixed 1/m)
        hybrid_grad: bool = True  # the HWM's CE trains the students through r_i (false: the code's copy)
        same_init: bool = True  # every student starts from student 1's weights (the code's default)

        def kd_scale(self, epoch: int) -> float:
            return self.kd_weight * super().kd_scale(epoch)

        def check(self) -> None:
            require(0.0 <= self.omega <= 1.0, "okdph", "omega", "in [0, 1]", self.omega)
            require(0.0 <= self.gamma <= 1.0, "okdph", "gamma", "in [0, 1]", self.gamma)
            require(self.fusion_every >= 0, "okdph", "fusion_every", ">= 0", self.fusion_every)
            require(self.fusion_unit in FUSION_UNITS, "okdph", "fusion_unit", " or ".join(FUSION_UNITS),
                    self.fusion_unit)
            require(self.hybrid in HYBRIDS, "okdph", "hybrid", " or ".join(HYBRIDS), self.hybrid)
            super().check()

    @classmethod
    def cohort_size(cls, options):
        return None  # weight averaging: one backbone for all students

    def __init__(self, spec, num_classes: int, options: "OKDPH.Options"):
        if isinstance(spec, (list, tuple)):
            raise ConfigError(f"method okdph {self.identical_networks}; set model.name to one backbone")
        super().__init__(spec, num_classes, options)
        m = options.num_networks
        self.num_views = m + 1  # one view per student, one for the HWM
        self.nets = IndependentNets(spec, m)
        if options.same_init:
            for net in self.nets.nets[1:]:
                net.load_state_dict(self.nets.nets[0].state_dict())
        # which model is reported (argmax at the last evaluation: a student, or m for the mean model)
        self.register_buffer("reported_index", torch.zeros((), dtype=torch.int64))

    def _states(self, detach: bool):
        """Per name, the students' parameters and (detached) buffers, in student 1's naming."""
        nets = self.nets.nets
        each_params = [dict(net.named_parameters()) for net in nets]
        each_buffers = [dict(net.named_buffers()) for net in nets]
        params = {n: [p[n] for p in each_params] for n in each_params[0]}
        buffers = {n: [b[n] for b in each_buffers] for n in each_buffers[0]}
        if detach:
            params = {n: [p.detach() for p in ps] for n, ps in params.items()}
        return params, buffers

    def hybrid_state(self, r: torch.Tensor, detach: bool) -> Dict[str, torch.Tensor]:
        """The HWM's weights sum_i r_i theta_i (differentiable unless ``detach``) and buffers (fresh tensors:
        a train-mode forward updates them, not the students')."""
        params, buffers = self._states(detach)
        state = {n: combine(ps, r) for n, ps in params.items()}
        with torch.no_grad():
            for n, bs in buffers.items():
                state[n] = combine([b.float() for b in bs], r).to(bs[0].dtype) if bs[0].is_floating_point() \
                    else bs[0].clone()
        return state

    def coefficients(self) -> torch.Tensor:
        m = self.options.num_networks
        if self.options.hybrid == "mean":
            return torch.full((m,), 1.0 / m, device=self.kd_scale.device)
        return dirichlet_ones(m, self.kd_scale.device)

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        opt, m = self.options, self.options.num_networks
        logits = self.nets.forward_views(views[:m])
        hybrid = functional_call(self.nets.nets[0], self.hybrid_state(self.coefficients(), not opt.hybrid_grad),
                                 (views[m],))
        teacher = logit_mean([*logits, hybrid]).detach()
        return {"ce": opt.omega * sum(F.cross_entropy(z, labels) for z in logits),
                "ce_hybrid": (1.0 - opt.omega) * F.cross_entropy(hybrid, labels),
                "kd_ensemble": self.kd_scale * sum(kd_loss(z, teacher, opt.temperature) for z in logits)}

    @torch.no_grad()
    def fuse(self, do=1.0) -> None:
        params, buffers = self._states(detach=True)
        for group in (*params.values(), *(b for b in buffers.values() if b[0].is_floating_point())):
            fuse_(group, self.options.gamma, do)

    def after_step(self, step, applied=1.0) -> None:
        opt = self.options
        if opt.fusion_every and opt.fusion_unit == "batch":
            # every K-th optimizer step that was applied (decided on the device)
            self.fuse((torch.remainder(step, opt.fusion_every) == 0).float() * applied)

    def after_epoch(self, epoch: int) -> None:
        opt = self.options
        if opt.fusion_every and opt.fusion_unit == "epoch" and epoch % opt.fusion_every == 0:
            self.fuse()

    def mean_model_state(self) -> Dict[str, torch.Tensor]:
        """The students' plain average (the HWM at r = 1/m), in ``create_model``'s layout."""
        m = self.options.num_networks
        with torch.no_grad():
            return {n: v.detach().clone() for n, v in
                    self.hybrid_state(torch.full((m,), 1.0 / m, device=self.kd_scale.device), True).items()}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.nets(images)
        out = {f"net{i + 1}": z for i, z in enumerate(logits)}
        out["hybrid"] = functional_call(self.nets.nets[0], self.mean_model_state(), (images,))
        out["ensemble"] = logit_mean(logits)
        return out

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        m = self.options.num_networks
        candidates = [acc[f"net{i + 1}"] for i in range(m)] + [acc["hybrid"]]
        best = max(range(m + 1), key=lambda i: candidates[i])
        self.reported_index.fill_(best)
        which = "the students' mean" if best == m else f"student {best + 1}"
        return [Summary("reported", f"best of students and their mean, now {which} (OKDPH code's rule)",
                        candidates[best]),
                Summary("net1", "student 1 (single-network protocol)", acc["net1"]),
                Summary("mean_net", "mean over students", sum(candidates[:m]) / m),
                Summary("hybrid", "the students' mean model (hybrid at r = 1/m)", acc["hybrid"]),
                Summary("ensemble", "logit-mean ensemble", acc["ensemble"])]

    def deployable_state_dict(self):
        index = int(self.reported_index)
        if index == self.options.num_networks:
            return self.mean_model_state()
        return self.nets.nets[index].state_dict()
