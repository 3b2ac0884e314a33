"""Loss helpers shared by the methods (docs/methods.md §1)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KD_T(z_s <- z_t) = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), averaged over the batch.

    The teacher is used as given: callers detach it when no gradient must flow.
    Computed in fp32 whatever the input precision, since softmax at temperature
    is where reduced precision hurts.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * (t * t)


def logit_mean(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of several models' logits (the plain logit ensemble)."""
    return torch.stack(list(logits)).mean(0)


def kd_to_others_mean(logits: Sequence[torch.Tensor], temperature: float, detach_teacher: bool) -> torch.Tensor:
    """sum_k KD_T(z_k <- mean_{l != k} z_l): CL's loss, and DML's ``target: others_mean`` form."""
    m = len(logits)
    teachers = [z.detach() for z in logits] if detach_teacher else list(logits)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for k in range(m):
        total = total + kd_loss(logits[k], logit_mean(teachers[l] for l in range(m) if l != k), temperature)
    return total


def sigmoid_rampup(epoch: int, length: int) -> float:
    """Laine & Aila's ramp-up w(e) = exp(-5 (1 - clip(e, 0, R)/R)^2) for 0-based epoch e.

    w(0) = e^-5, w(e) = 1 for e >= R; R = 0 switches the ramp-up off (w = 1).
    """
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0), length) / length
    return math.exp(-5.0 * phase * phase)
