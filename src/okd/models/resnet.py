"""CIFAR ResNets as in OKDDip's ``model_cifar/resnet.py`` (docs/methods.md §2).

torchvision-style blocks with a 3x3 stem, option-B (1x1 conv + BN) projection
shortcuts, Kaiming-normal (fan_out) conv init. ``resnet110`` is Bottleneck
[12,12,12] and ``wrn20_8`` is Bottleneck [2,2,2] with inner width x8, as the
field's code defines them (not He et al.'s or Zagoruyko's networks).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from torch import nn

from . import BACKBONES
from .nets import BackboneSpec, Branch


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, width_factor=1):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, width_factor=1):
        super().__init__()
        width = planes * width_factor
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_stage(block, cin, planes, blocks, stride, width_factor):
    cout = planes * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    layers = [block(cin, planes, stride, downsample, width_factor)]
    layers += [block(cout, planes, 1, None, width_factor) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet_spec(block, layers: Sequence[int], num_classes: int, widths=(16, 32, 64), width_factor=1):
    stem = widths[0]

    def make_trunk():
        trunk = nn.Sequential(
            conv3x3(3, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            make_stage(block, stem, widths[0], layers[0], 1, width_factor),
            make_stage(block, widths[0] * block.expansion, widths[1], layers[1], 2, width_factor),
        )
        init_weights(trunk)
        return trunk

    feature_dim = widths[2] * block.expansion

    def deeper_branch(level: int, units: int = 0):
        body = nn.Sequential(  # the authors' resnet_ahbf: stage 3 of branch i has layers[2] + i * aux blocks
            make_stage(block, widths[1] * block.expansion, widths[2], layers[2] + level * units, 2, width_factor),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        init_weights(body)
        return Branch(body, nn.Linear(feature_dim, num_classes), map_layers=1, pool_layers=3)

    return BackboneSpec(make_trunk, lambda: deeper_branch(0), feature_dim, trunk_channels=widths[1] * block.expansion,
                        init_weights=init_weights, deeper_branch=deeper_branch)


BACKBONES.register("resnet32")(partial(resnet_spec, BasicBlock, [5, 5, 5]))
BACKBONES.register("resnet56")(partial(resnet_spec, BasicBlock, [9, 9, 9]))  # MCL's resnet56, same family
BACKBONES.register("resnet110")(partial(resnet_spec, Bottleneck, [12, 12, 12]))
BACKBONES.register("wrn20_8", "wide_resnet20_8")(partial(resnet_spec, Bottleneck, [2, 2, 2], width_factor=8))
# A few thousand parameters: for tests and the quickstart, not for papers.
BACKBONES.register("resnet8_tiny", "tiny")(partial(resnet_spec, BasicBlock, [1, 1, 1], widths=(8, 16, 32)))
