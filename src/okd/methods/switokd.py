"""SwitOKD: Switchable Online Knowledge Distillation (Qian et al., ECCV 2022), docs/methods.md §14.

A teacher t and a student s, independent networks trained together from
scratch on one view (``model.name: [teacher, student]`` for a cohort). Per
batch, on detached softmax outputs, three batch means:

  s_gap = mean_i ||p_s,i - y_i||_1,  t_gap = mean_i ||p_t,i - y_i||_1,  G = mean_i ||p_t,i - p_s,i||_1

the adaptive threshold delta = s_gap - exp(-t_gap / (t_gap + s_gap)) t_gap, and the
mode: **expert** when G > delta and t_gap < s_gap (the teacher is paused: no
gradient, no SGD step, its weights and momentum kept; it still runs in train
mode, so its BatchNorm statistics move), **learning** otherwise:

  L = CE(z_s, y) + KD_T(z_s <- sg(z_t)) + learning * [CE(z_t, y) + KD_T(z_t <- sg(z_s))]

Where T enters (``temperature_form``; the same at the default T = 1): ``code``, the authors' functions:
s_gap and t_gap at T = 1, G and the KL terms softened at T, without T^2; ``scaled``: T in all three gaps
and T^2 on the KL terms.

The switch is decided on the device every batch (no host sync), from the global
batch's means under torchrun. Reported: the
student (the paper's table reports it; best epoch), the teacher beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_sum
from ..losses import kd_loss
from ..models import IndependentNets
from . import METHODS
from .base import IndependentNetworksMethod, KDOptions, Summary, require


TEMPERATURE_FORMS = ("code", "scaled")


def distribution_gaps(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, form: str = "scaled"):
    """(s_gap, t_gap, G): batch-mean L1 distances of the student's and the teacher's outputs from the one-hot
    labels, and between them (all on detached logits). ``scaled``: every softmax at T; ``code``: the authors'
    functions, ``dist_s_label`` without T (s_gap, t_gap at T = 1) and ``dist_s_t(p, q, T)`` at T (G)."""
    def probs(z, t):
        return F.softmax(z.detach().float() / t, dim=1)

    label_t = 1.0 if form == "code" else temperature
    p_t, p_s = probs(teacher_logits, label_t), probs(student_logits, label_t)
    y = F.one_hot(labels, p_t.shape[1]).to(p_t.dtype)
    s_gap = (p_s - y).abs().sum(1).mean()
    t_gap = (p_t - y).abs().sum(1).mean()
    if label_t != temperature:
        p_t, p_s = probs(teacher_logits, temperature), probs(student_logits, temperature)
    gap = (p_t - p_s).abs().sum(1).mean()
    return s_gap, t_gap, gap


def switokd_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, form: str):
    """KL(softmax(z_t/T) || softmax(z_s/T)): with T^2 (``scaled``, the line of work's KD_T) or without
    (``code``: the authors' ``kl_div(p, q, T)``)."""
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return kd if form == "scaled" else kd / (float(temperature) ** 2)


def switch_threshold(s_gap: torch.Tensor, t_gap: torch.Tensor) -> torch.Tensor:
    """delta = s_gap - exp(-t_gap / (t_gap + s_gap)) * t_gap, between s_gap - t_gap and s_gap."""
    return s_gap - torch.exp(-t_gap / (t_gap + s_gap)) * t_gap


def expert_mode(s_gap: torch.Tensor, t_gap: torch.Tensor, gap: torch.Tensor, teacher_ahead: bool = True
                ) -> torch.Tensor:
    """1.0 where the teacher pauses (G > delta, and with ``teacher_ahead`` t_gap < s_gap), else 0.0."""
    expert = gap > switch_threshold(s_gap, t_gap)
    if teacher_ahead:
        expert = expert & (t_gap < s_gap)
    return expert.float()


@METHODS.register("switokd", title="SwitOKD")
class SwitOKD(IndependentNetworksMethod):
    cohort_hint = " (a teacher and a student)"
    # the CIFAR-100 code (main.py): its own WRN-16-2 teacher and the 0.5 MobileNetV2 student, SGD without
    # Nesterov, ``range(1, 300)`` epochs with lr x0.1 on entering epochs 140/200/250 (after 139/199/249 of 299)
    recipe = {"model.name": ["switokd_wrn16_2", "mobilenetv2"], "optim.nesterov": False, "train.epochs": 299,
              "schedule.milestones": [139, 199, 249]}

    @dataclass
    class Options(KDOptions):
        temperature: float = 1.0  # the authors' code: T = 1 in G, delta and the KL terms
        # where T enters (the same at T = 1): "code", the authors' functions (s_gap and t_gap without T, G and
        # the KL terms softened at T, no T^2); "scaled", T in all three gaps and T^2 on the KL terms
        temperature_form: str = "code"
        rampup_epochs: int = 0  # none
        # the expert mode also needs the teacher closer to the labels than the student (the code's guard;
        # the paper's Fig. 1 shows only G > delta)
        teacher_ahead: bool = True
        # the student's lr relative to optim.lr: the CIFAR-100 code trains its student at 0.01, its teacher at 0.1
        student_lr_scale: float = 0.1

        def check(self) -> None:
            require(self.student_lr_scale > 0, "switokd", "student_lr_scale", "> 0", self.student_lr_scale)
            require(self.temperature_form in TEMPERATURE_FORMS, "switokd", "temperature_form",
                    " or ".join(TEMPERATURE_FORMS), self.temperature_form)
            super().check()

    @classmethod
    def cohort_size(cls, options) -> Optional[int]:
        return 2

    def __init__(self, spec, num_classes: int, options: "SwitOKD.Options"):
        super().__init__(spec, num_classes, options)
        self.nets = IndependentNets(spec, 2)  # [teacher, student]
        self.register_buffer("expert", torch.zeros(()), persistent=False)  # this step's mode, read by SGD
        # steps in expert mode, of all steps taken: the run's switching record (saved, so a resume keeps it)
        self.register_buffer("mode_counts", torch.zeros(2, dtype=torch.float64))

    @property
    def teacher(self):
        return self.nets.nets[0]

    @property
    def student(self):
        return self.nets.nets[1]

    @property
    def deployable_backbone(self) -> str:
        return self.backbones[-1]

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        T, form = self.options.temperature, self.options.temperature_form
        z_t, z_s = self.teacher(views[0]), self.student(views[0])
        gaps = torch.stack(distribution_gaps(z_t, z_s, labels, T, form))
        if torch.distributed.is_initialized():  # one decision for the global batch: the teacher stays one model
            gaps = all_reduce_sum(gaps) / torch.distributed.get_world_size()
        expert = expert_mode(*gaps, self.options.teacher_ahead)
        self.expert.copy_(expert)  # the optimizer holds the teacher's group on it
        learning = 1.0 - expert
        return {"ce_student": F.cross_entropy(z_s, labels),
                "kd_student": self.kd_scale * switokd_kd(z_s, z_t.detach(), T, form),
                "ce_teacher": learning * F.cross_entropy(z_t, labels),
                "kd_teacher": learning * self.kd_scale * switokd_kd(z_t, z_s.detach(), T, form)}

    def after_step(self, step, applied=1.0) -> None:
        with torch.no_grad():
            self.mode_counts.add_(torch.stack([self.expert.double(), torch.ones((), dtype=torch.float64,
                                                                               device=self.expert.device)])
                                  * applied)

    def parameter_groups(self) -> List[Dict]:
        return [{"params": list(self.teacher.parameters()), "hold": self.expert},
                {"params": list(self.student.parameters()), "lr_scale": self.options.student_lr_scale}]

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        z_t, z_s = self.nets(images)
        return {"student": z_s, "teacher": z_t}

    def diagnostic_groups(self, names) -> Dict[str, List[str]]:
        return {"pair": ["teacher", "student"]}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        hetero = len(set(self.backbones)) > 1
        student = f"student ({self.backbones[1]}, paper protocol)" if hetero else "student (paper protocol)"
        taken = float(self.mode_counts[1])
        paused = f"paused in {100.0 * float(self.mode_counts[0]) / taken:.1f} % of steps so far" if taken else "paused"
        teacher = f"teacher ({self.backbones[0]}; {paused})" if hetero else f"teacher ({paused})"
        return [Summary("reported", student, acc["student"]), Summary("teacher", teacher, acc["teacher"])]

    def deployable_state_dict(self):
        return self.student.state_dict()


__all__ = ["SwitOKD", "distribution_gaps", "expert_mode", "switch_threshold", "switokd_kd"]
