"""Running a shared trunk once over several augmented views without changing BatchNorm.

The seed ran the trunk once per view, so every view was normalised with its
own batch statistics and the running statistics received one update per view,
in order. ``ViewBatchNorm2d`` gives a trunk that is run once on the views
concatenated along the batch exactly those semantics: in training mode with
``views > 1`` it splits its input into the views and normalises each in turn
with the parent class's own forward (so running statistics get the same
sequential updates), while the convolutions in between see one large batch.
``views = 1`` (and eval mode) is plain BatchNorm. ``ViewSyncBatchNorm`` does
the same with SyncBatchNorm (``train.sync_bn`` under torchrun): each view's
statistics are synchronised across processes, still per view.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class PerViewNorm:
    """Mixin for a BatchNorm class: normalise the ``views`` equal chunks of the batch one by one."""

    views: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views <= 1 or not self.training:
            return super().forward(x)
        if x.shape[0] % self.views:
            raise ValueError(f"batch of {x.shape[0]} does not split into {self.views} views")
        if self.momentum is None:
            raise ValueError("per-view BatchNorm needs a momentum (cumulative averaging is not supported)")
        return torch.cat([super(PerViewNorm, self).forward(chunk) for chunk in x.chunk(self.views)])


class ViewBatchNorm2d(PerViewNorm, nn.BatchNorm2d):
    pass


class ViewSyncBatchNorm(PerViewNorm, nn.SyncBatchNorm):
    pass


def _replace(child: _BatchNorm, cls) -> nn.Module:
    new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
    new.load_state_dict(child.state_dict())
    new.views = getattr(child, "views", 1)
    return new.to(child.weight.device if child.weight is not None else "cpu")


def convert_view_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` by a ViewBatchNorm2d with the same state (keys unchanged)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, _replace(child, ViewBatchNorm2d))
        else:
            convert_view_bn(child)
    return module


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm for every BatchNorm, keeping per-view normalisation where a trunk runs fused views.

    (``nn.SyncBatchNorm.convert_sync_batchnorm`` would turn a ViewBatchNorm2d into a
    plain SyncBatchNorm, normalising all views jointly.)
    """
    for name, child in module.named_children():
        if isinstance(child, PerViewNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, _replace(child, ViewSyncBatchNorm))
        elif isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, _replace(child, nn.SyncBatchNorm))
        else:
            convert_sync_batchnorm(child)
    return module


def set_views(module: nn.Module, views: int) -> None:
    for m in module.modules():
        if isinstance(m, PerViewNorm):
            m.views = views
