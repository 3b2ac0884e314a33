"""CIFAR ShuffleNetV2 as MCL defines it (winycg/MCL ``models/shufflenetv2.py``, ``ShuffleNetV2_1x`` / ``_05x``).

``shufflenetv2`` is net size 1 ("ShuffleNetV2 1x" of MCL's CIFAR-100 tables), ``shufflenetv2_x0_5`` net
size 0.5 (also in MCL's table). A 3x3 stride-1 stem conv to 24 + BN + ReLU (no max-pool); three stages,
each a stride-2 down unit followed by 3, 7, 3 basic units, of 116/232/464 channels (48/96/192 at 0.5x);
a 1x1 conv to 1024 + BN + ReLU; average pooling (MCL's avg_pool2d(4) on the 4x4 map of a 32x32 image:
the global mean) and the FC. A basic unit splits the channels in halves, keeps the first and sends the
second through 1x1 conv-BN-ReLU, depthwise 3x3 conv-BN, 1x1 conv-BN-ReLU; a down unit sends the whole
input through two paths (depthwise 3x3/2-BN, 1x1-BN-ReLU; and 1x1-BN-ReLU, depthwise 3x3/2-BN,
1x1-BN-ReLU). Both concatenate their two halves and shuffle the channels in 2 groups. PyTorch's default
initialisation everywhere, as MCL's code leaves it.

The split (docs/methods.md §2): the trunk is the stem + stages 1-2 (232 x 8 x 8 at 1x); a branch is
stage 3 + the 1x1 conv to 1024 + BN-ReLU (the last feature map, 1024 x 4 x 4) + pooling + FC: 80 % of
the parameters at 100 classes (88 % at 0.5x). MCL's own multi-branch ShuffleNetV2 (``ShuffleNetV2_b``)
shares only the stem and stage 1; okd splits every CIFAR backbone before its last stage.

Units split, join and shuffle channels, so each declares its grouped form (``okd.models.grouped``):
with m branches stacked along the channels, the split and the shuffle act within each branch's block.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from . import BACKBONES
from .grouped import batched_clone, grouped_form
from .nets import BackboneSpec, Branch

CONFIGS = {  # net size -> (stage widths, final conv width); blocks per stage: one down unit + BLOCKS basic units
    0.5: ((48, 96, 192), 1024),
    1: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2: ((224, 488, 976), 2048),
}
BLOCKS = (3, 7, 3)
STEM = 24


def conv_bn(cin, cout, kernel, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


def halves(x: torch.Tensor, m: int):
    """Each of the m stacked blocks' first and second channel halves, each stacked again: (B, m*C/2, H, W) twice."""
    xs = x.unflatten(1, (m, -1))
    half = xs.shape[2] // 2
    return xs[:, :, :half].flatten(1, 2), xs[:, :, half:].flatten(1, 2)


def join_shuffle(a: torch.Tensor, b: torch.Tensor, m: int, like: torch.Tensor) -> torch.Tensor:
    """Per block: concatenate [a, b] (equal widths) and shuffle in 2 groups, i.e. interleave a_0, b_0, a_1, b_1, ..."""
    out = torch.stack([a.unflatten(1, (m, -1)), b.unflatten(1, (m, -1))], dim=3).flatten(1, 3)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class BasicUnit(nn.Module):
    """Stride 1: the first half passes, the second goes through ``branch``; joined and shuffled."""

    m = 1  # blocks stacked along the channels (the grouped form's m)

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(*conv_bn(half, half, 1), *conv_bn(half, half, 3, groups=half, relu=False),
                                    *conv_bn(half, half, 1))

    def forward(self, x):
        keep, through = halves(x, self.m)
        return join_shuffle(keep, self.branch(through), self.m, x)


class DownUnit(nn.Module):
    """Stride 2: two paths over the whole input to ``cout / 2`` channels each; joined and shuffled."""

    m = 1

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(*conv_bn(cin, cin, 3, 2, groups=cin, relu=False), *conv_bn(cin, mid, 1))
        self.right = nn.Sequential(*conv_bn(cin, mid, 1), *conv_bn(mid, mid, 3, 2, groups=mid, relu=False),
                                   *conv_bn(mid, mid, 1))

    def forward(self, x):
        return join_shuffle(self.left(x), self.right(x), self.m, x)


@grouped_form(BasicUnit)
class GroupedBasicUnit(BasicUnit):
    """m basic units on channel-stacked input: halves and shuffle within each unit's own channels."""

    def __init__(self, members: Sequence[BasicUnit]):
        nn.Module.__init__(self)
        self.m = len(members)
        self.branch = batched_clone([u.branch for u in members])


@grouped_form(DownUnit)
class GroupedDownUnit(DownUnit):
    """m down units on channel-stacked input: each path grouped, joined and shuffled within each unit."""

    def __init__(self, members: Sequence[DownUnit]):
        nn.Module.__init__(self)
        self.m = len(members)
        self.left = batched_clone([u.left for u in members])
        self.right = batched_clone([u.right for u in members])


def stage(cin, cout, blocks):
    return nn.Sequential(DownUnit(cin, cout), *[BasicUnit(cout) for _ in range(blocks)])


def shufflenetv2_spec(net_size: float, num_classes: int) -> BackboneSpec:
    widths, last = CONFIGS[net_size]

    def make_trunk():
        return nn.Sequential(*conv_bn(3, STEM, 3), stage(STEM, widths[0], BLOCKS[0]),
                             stage(widths[0], widths[1], BLOCKS[1]))

    def deeper_branch(level: int, units: int = 0):
        # AHBF's rule for its ResNets, on the last stage: BLOCKS[2] + level * units basic units
        to_map = [stage(widths[1], widths[2], BLOCKS[2] + level * units), *conv_bn(widths[2], last, 1)]
        body = nn.Sequential(*to_map, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Branch(body, nn.Linear(last, num_classes), map_layers=len(to_map), pool_layers=len(to_map) + 2)

    return BackboneSpec(make_trunk, lambda: deeper_branch(0), last, trunk_channels=widths[1],
                        deeper_branch=deeper_branch)  # init: PyTorch's default everywhere (no_init)


BACKBONES.register("shufflenetv2", "shufflenetv2_x1_0", "ShuffleNetV2_1x")(partial(shufflenetv2_spec, 1))
BACKBONES.register("shufflenetv2_x0_5", "ShuffleNetV2_05x")(partial(shufflenetv2_spec, 0.5))
