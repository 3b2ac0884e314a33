"""The interface every online-distillation method implements.

A method owns all of its networks (students, teachers, temporal means) as one
``nn.Module``; the trainer only sees this interface (mdistiller style):

* ``num_views``: how many independently augmented views of each batch it wants;
* ``forward_train(views, labels, epoch)`` -> (total loss, {term name: value});
* ``after_step(step)``: bookkeeping after each optimizer step (e.g. EMA);
* ``evaluate_logits(images)`` -> {model name: logits} for every model it can test;
* ``summary_metrics(acc)`` -> the labelled headline numbers, the first of which
  selects the ``best`` checkpoint;
* ``deployable_state_dict()``: the reported model, loadable into
  ``okd.create_model(backbone, num_classes)``;
* ``parameter_groups()``: what the optimizer trains, as SGD parameter groups
  (a group may override e.g. ``weight_decay``, as FFL's fusion module does).

Each method's loss is also a plain function of logits/features in its file,
so it can be checked against hand-computed values without building networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..models import BackboneSpec, IndependentNets


@dataclass(frozen=True)
class Summary:
    key: str  # stable name used in metrics files and TensorBoard
    label: str  # what a human reads in logs
    value: float


class Method(nn.Module):
    @dataclass
    class Options:
        pass

    num_views: int = 1

    def __init__(self, spec: BackboneSpec, num_classes: int, options):
        super().__init__()
        self.options = options
        self.num_classes = num_classes

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor, epoch: int
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, views: List[torch.Tensor], labels: torch.Tensor, epoch: int):
        """``forward_train``: the trainer calls the module (through DDP under torchrun)."""
        return self.forward_train(views, labels, epoch)

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (0-based global index)."""

    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        raise NotImplementedError

    def deployable_state_dict(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def parameter_groups(self) -> List[Dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]


def require(ok: bool, method: str, option: str, requirement: str, value) -> None:
    """A one-line ConfigError naming the option, what it must be and what it was."""
    if not ok:
        raise ConfigError(f"config key 'method.{option}' must be {requirement} for {method}, got {value!r}")


def numbered_logits(prefix: str, logits: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{"<prefix>1": z_1, "<prefix>2": z_2, ...}: the names models are logged under."""
    return {f"{prefix}{i + 1}": z for i, z in enumerate(logits)}


def member_summaries(acc: Dict[str, float], prefix: str, count: int, noun: str) -> List[Summary]:
    """Member 1 as the reported model (spec sections 3-6, 8), then the mean over all members."""
    values = [acc[f"{prefix}{i + 1}"] for i in range(count)]
    return [Summary("reported", f"{noun} 1 (reported)", values[0]),
            Summary(f"mean_{prefix}", f"mean over {noun}s", sum(values) / count)]


class IndependentNetworksMethod(Method):
    """Shared test-time side of methods with m independent networks in ``self.nets`` (DML, KDCL)."""

    nets: IndependentNets

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.nets(images)
        return {**numbered_logits("net", logits), "ensemble": torch.stack(logits).mean(0)}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        return [*member_summaries(acc, "net", len(self.nets), "network"),
                Summary("ensemble", "logit-mean ensemble", acc["ensemble"])]

    def deployable_state_dict(self):
        return self.nets.nets[0].state_dict()
