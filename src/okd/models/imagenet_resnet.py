"""ResNet-18/34/50 in torchvision's layout, for ImageNet-scale data (docs/methods.md §2).

The same blocks as torchvision's ``resnet18/34/50`` (v1.5: the stride of a
bottleneck on its 3x3 conv; option-B projection shortcuts; Kaiming-normal
fan-out conv init, BatchNorm ones/zeros, PyTorch's default Linear init). The
shared trunk is the stem and ``layer1``-``layer3``; a branch is ``layer4``,
the pooling and the classifier, as the online-KD papers split their ImageNet
ResNets. The modules keep torchvision's names, so the deployable network's
weights load with ``strict=True`` into ``torchvision.models.resnet18()`` after
``torchvision_state_dict`` drops okd's ``trunk.`` / ``branch.body.`` /
``branch.`` prefixes.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Dict, Sequence

import torch
from torch import nn

from . import BACKBONES
from .nets import BackboneSpec, Branch
from .resnet import BasicBlock, Bottleneck, init_weights, make_stage

WIDTHS = (64, 128, 256, 512)


def imagenet_resnet_spec(block, layers: Sequence[int], num_classes: int) -> BackboneSpec:
    e = block.expansion

    def make_trunk():
        trunk = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
            ("bn1", nn.BatchNorm2d(64)),
            ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool2d(3, stride=2, padding=1)),
            ("layer1", make_stage(block, 64, WIDTHS[0], layers[0], 1, 1)),
            ("layer2", make_stage(block, WIDTHS[0] * e, WIDTHS[1], layers[1], 2, 1)),
            ("layer3", make_stage(block, WIDTHS[1] * e, WIDTHS[2], layers[2], 2, 1)),
        ]))
        init_weights(trunk)
        return trunk

    def make_branch():
        body = nn.Sequential(OrderedDict([
            ("layer4", make_stage(block, WIDTHS[2] * e, WIDTHS[3], layers[3], 2, 1)),
            ("avgpool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
        ]))
        init_weights(body)
        return Branch(body, nn.Linear(WIDTHS[3] * e, num_classes), map_layers=1, pool_layers=3)

    return BackboneSpec(make_trunk, make_branch, WIDTHS[3] * e, trunk_channels=WIDTHS[2] * e, init_weights=init_weights)


def torchvision_state_dict(single_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A deployable ``SingleNet`` state dict of resnet18/34/50 in torchvision's key layout."""
    out = {}
    for key, value in single_state.items():
        for prefix in ("trunk.", "branch.body.", "branch."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if not key.startswith("flatten"):
            out[key] = value
    return out


BACKBONES.register("resnet18")(partial(imagenet_resnet_spec, BasicBlock, [2, 2, 2, 2]))
BACKBONES.register("resnet34")(partial(imagenet_resnet_spec, BasicBlock, [3, 4, 6, 3]))
BACKBONES.register("resnet50")(partial(imagenet_resnet_spec, Bottleneck, [3, 4, 6, 3]))
