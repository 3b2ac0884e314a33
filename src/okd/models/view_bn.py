"""Running a shared trunk once over several augmented views without changing BatchNorm.

The seed ran the trunk once per view, so every view was normalised with its
own batch statistics and the running statistics received one update per view,
in order. ``ViewBatchNorm2d`` gives a trunk that is run once on the views
concatenated along the batch exactly those semantics: in training mode with
``views > 1`` it splits its input into the views and applies the same fused
``batch_norm`` kernel to each in turn (so running statistics get the same
sequential updates), while the convolutions in between see one large batch.
``views = 1`` (and eval mode) is plain BatchNorm2d.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ViewBatchNorm2d(nn.BatchNorm2d):
    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views <= 1 or not self.training:
            return super().forward(x)
        if x.shape[0] % self.views:
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.views} views")
        if self.momentum is None:
            raise ValueError("ViewBatchNorm2d needs a momentum (cumulative averaging is not supported)")
        outs = []
        for chunk in x.chunk(self.views):
            self.num_batches_tracked.add_(1)
            outs.append(F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias,
                                     True, self.momentum, self.eps))
        return torch.cat(outs)


def convert_view_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a ViewBatchNorm2d with the same state (keys unchanged)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = ViewBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.weight is not None else "cpu")
            setattr(module, name, new)
        else:
            convert_view_bn(child)
    return module


def set_views(module: nn.Module, views: int) -> None:
    for m in module.modules():
        if isinstance(m, ViewBatchNorm2d):
            m.views = views
