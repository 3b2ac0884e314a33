"""Vanilla: one network trained with cross-entropy; the baseline column of every KD table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..models import SingleNet
from . import METHODS
from .base import Method, MethodOptions, Summary


@METHODS.register("vanilla", "baseline", title="Vanilla")
class Vanilla(Method):
    identical_networks = "trains one network"
    @dataclass
    class Options(MethodOptions):
        pass

    def __init__(self, spec, num_classes: int, options: "Vanilla.Options"):
        super().__init__(spec, num_classes, options)
        self.net = SingleNet(spec.make_trunk(), spec.make_branch())

    def forward_train(self, views: List[torch.Tensor], labels: torch.Tensor):
        return {"ce": F.cross_entropy(self.net(views[0]), labels)}

    @torch.no_grad()
    def evaluate_logits(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"net": self.net(images)}

    def summary_metrics(self, acc: Dict[str, float]) -> List[Summary]:
        return [Summary("reported", "network (reported)", acc["net"])]

    def deployable_state_dict(self):
        return self.net.state_dict()
