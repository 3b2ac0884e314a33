"""Zagoruyko & Komodakis wide ResNets for CIFAR, WRN-d-k, as MCL defines them (winycg/MCL ``models/wrn.py``).

Depth d = 6n + 4: a 3x3 stem conv (16, no BN after it), three groups of n
pre-activation BasicBlocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3; widths 16k, 32k,
64k, strides 1/2/2; no dropout, MCL's dropRate 0), a bias-free 1x1 conv
shortcut where the width changes (it reads the block's BN-ReLU'd input, as the
reference code does; an identity shortcut reads the raw input), then a final
BN-ReLU, global average pooling and the FC. Convolutions Kaiming-normal
(fan-out), BN weight 1 and bias 0, Linear bias 0 (weight PyTorch's default).

The split (docs/methods.md §2): the trunk is the stem + groups 1-2 (32k x 16 x
16); a branch is group 3 + the final BN-ReLU (its last feature map, 64k x 8 x 8)
+ pooling + FC. (MCL's own multi-branch WRN, ``WideResNet_b``, shares only the
stem and group 1; okd splits every CIFAR backbone before its last stage.)
"""
from __future__ import annotations

from functools import partial

from torch import nn

from . import BACKBONES
from .nets import BackboneSpec, Branch


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut (1x1 conv on the pre-activated input if the width changes)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def group(cin, cout, blocks, stride):
    return nn.Sequential(PreActBlock(cin, cout, stride), *[PreActBlock(cout, cout) for _ in range(1, blocks)])


def init_linear(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.bias)  # the weight keeps PyTorch's default, as in MCL's WideResNet


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # N(0, 2 / (k*k*out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_linear(m)


def wrn_spec(depth: int, widen: int, num_classes: int) -> BackboneSpec:
    if (depth - 4) % 6:
        raise ValueError(f"a WRN's depth is 6n + 4, got {depth}")
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)

    def make_trunk():
        trunk = nn.Sequential(
            conv3x3(3, widths[0]),
            group(widths[0], widths[1], n, 1),
            group(widths[1], widths[2], n, 2),
        )
        init_weights(trunk)
        return trunk

    def deeper_branch(level: int, units: int = 0):
        body = nn.Sequential(  # AHBF's rule for its ResNets, on the last group: n + level * units blocks
            group(widths[2], widths[3], n + level * units, 2), nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        branch = Branch(body, nn.Linear(widths[3], num_classes), map_layers=3, pool_layers=5)
        init_weights(branch)
        return branch

    return BackboneSpec(make_trunk, lambda: deeper_branch(0), widths[3], trunk_channels=widths[2],
                        init_linear=init_linear, init_weights=init_weights, deeper_branch=deeper_branch)


BACKBONES.register("wrn16_2", "wrn_16_2")(partial(wrn_spec, 16, 2))
BACKBONES.register("wrn40_2", "wrn_40_2")(partial(wrn_spec, 40, 2))
BACKBONES.register("wrn16_4", "wrn_16_4")(partial(wrn_spec, 16, 4))
BACKBONES.register("wrn40_1", "wrn_40_1")(partial(wrn_spec, 40, 1))
