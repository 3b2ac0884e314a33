"""SwitOKD's own WRN-16-2 teacher (hfutqian/SwitOKD ``SwitOKD_code/CIFAR-100/WRN16-2_0.5mobilenetv2/models/
wrnet.py``, ``wrnet16``: the widely copied ``Wide_ResNet`` of meliketoy/wide-resnet.pytorch), as its code trains it.

It differs from MCL's WRN-16-2 (``wrn16_2``, okd.models.wrn) in five ways, all kept here:

- every convolution has a bias (704,420 parameters at 100 classes against 703,284);
- a block's stride is on its *second* 3x3 conv (BN-ReLU-conv3x3/1, BN-ReLU-conv3x3/s);
- the 1x1 shortcut conv (biased; where the stride or the width changes) reads the block's *raw* input, not
  its pre-activation;
- the final BatchNorm has ``momentum=0.9`` (PyTorch's weight of the new batch: the running statistics are
  mostly the last batch's), the blocks' BatchNorms PyTorch's 0.1;
- convolutions Xavier-uniform with gain sqrt(2) and bias 0, BatchNorm 1/0, the classifier PyTorch's default.

The block's dropout (rate 0.3 in ``wrnet16``) is built but commented out of its forward, so none is applied
here. No BN after the stem; the final BN-ReLU, average pooling (``avg_pool2d(8)`` of the 8x8 map: the global
mean) and the classifier. Split (docs/methods.md §2) as every CIFAR backbone: the trunk is the stem and
groups 1-2, a branch is group 3 + the final BN-ReLU (its last feature map) + pooling + FC.
"""
from __future__ import annotations

import math
from functools import partial

from torch import nn

from . import BACKBONES
from .nets import BackboneSpec, Branch


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3 (stride 1), BN-ReLU-conv3x3 (stride s), plus the shortcut of the raw input."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        self.relu = nn.ReLU()  # not in place: the raw input still feeds the shortcut
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=True) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


def group(cin, cout, blocks, stride):
    return nn.Sequential(WideBasic(cin, cout, stride), *[WideBasic(cout, cout) for _ in range(1, blocks)])


def init_weights(module: nn.Module) -> None:
    """The code's ``conv_init``: Xavier-uniform (gain sqrt 2) convs with zero bias, BatchNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2))
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def switokd_wrn_spec(depth: int, widen: int, num_classes: int) -> BackboneSpec:
    if (depth - 4) % 6:
        raise ValueError(f"a WRN's depth is 6n + 4, got {depth}")
    n = (depth - 4) // 6
    widths = (16, 16 * widen, 32 * widen, 64 * widen)

    def make_trunk():
        trunk = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=True),
                              group(widths[0], widths[1], n, 1), group(widths[1], widths[2], n, 2))
        init_weights(trunk)
        return trunk

    def make_branch():
        body = nn.Sequential(group(widths[2], widths[3], n, 2), nn.BatchNorm2d(widths[3], momentum=0.9),
                             nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        branch = Branch(body, nn.Linear(widths[3], num_classes), map_layers=3, pool_layers=5)
        init_weights(branch)
        return branch

    return BackboneSpec(make_trunk, make_branch, widths[3], trunk_channels=widths[2], init_weights=init_weights)


BACKBONES.register("switokd_wrn16_2")(partial(switokd_wrn_spec, 16, 2))
