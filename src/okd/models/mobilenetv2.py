"""CIFAR MobileNetV2 as CRD defines it (``mobilenetv2_T_w``), which SwitOKD copies for its CIFAR-100 student
(hfutqian/SwitOKD ``SwitOKD_code/CIFAR-100/WRN16-2_0.5mobilenetv2/models/mobilenetv2.py``, ``mobile_half``).

``mobilenetv2`` is ``mobile_half``: width 0.5, expansion T = 6, the "0.5MobileNetV2 (0.81M)" of SwitOKD's
Table 4. A 3x3 stride-2 stem conv (int(32w) channels) + BN + ReLU; seven stages of inverted residuals
(t, c, n, s) = (1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2),
(T, 320, 1, 1) with c scaled by w (int(c*w)); every inverted residual has its 1x1 expansion conv, even at
t = 1 (CRD's form, unlike torchvision's), then the depthwise 3x3 and the linear 1x1, each with BN; the
identity is added where the stride is 1 and the width unchanged. A 1x1 conv to 1280 + BN + ReLU, average
pooling (CRD's AvgPool2d(2, ceil_mode) on the 2x2 map of a 32x32 image: the global mean) and the FC.
Convolutions N(0, 2 / (k*k*out)) (Kaiming fan-out), BN 1/0, Linear N(0, 0.01) with bias 0.

The split (docs/methods.md §2) is AHBF's multi-branch ``mobile_half`` (linruigong965/AHBF
``AHBF-pytorch/models/model_backbone/mobile_ahbf.py``): the trunk is the stem + stages 1-4 (int(64w) x 4 x 4);
a branch is stages 5-7 (96/160/320 x w; 4 x 4, then 2 x 2) + the 1x1 conv to 1280 + BN-ReLU (the last
feature map, 1280 x 2 x 2) + pooling + FC: 92 % of the network's parameters at 100 classes.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from . import BACKBONES
from .nets import BackboneSpec, Branch

BASE_WIDTH, LAST_CHANNEL = 32, 1280


def settings(T):
    # (expansion t, output channels c, blocks n, first stride s) of the seven stages
    return [(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2),
            (T, 320, 1, 1)]


def conv_bn_relu(cin, cout, kernel, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU, 3x3 depthwise + BN + ReLU, 1x1 linear + BN; plus x where shapes allow."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *conv_bn_relu(cin, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def stages(cin, width, T, which, extra=None):
    """The stages ``which`` (indices into ``settings``) from ``cin`` channels, stage j with ``extra[j]`` more
    blocks; (modules, output channels)."""
    out = []
    extra = extra or [0] * len(which)
    for (t, c, n, s), more in zip([settings(T)[i] for i in which], extra):
        n += more
        cout = int(c * width)
        out.append(nn.Sequential(*[InvertedResidual(cin if i == 0 else cout, cout, s if i == 0 else 1, t)
                                   for i in range(n)]))
        cin = cout
    return out, cin


def init_linear(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_linear(m)


TRUNK_STAGES, BRANCH_STAGES = range(4), range(4, 7)  # AHBF's split of mobile_half


def extra_blocks(level: int, units: int):
    """AHBF's rule for its deeper MobileNetV2 branches (mobile_ahbf.py: "add auxiliary layers monotonously stage
    by stage, ... lower layer first"): level i adds ``units`` blocks to stages 5, 6, 7 in turn, i.e.
    (i//3 + [i%3 >= 1], i//3 + [i%3 == 2], i//3) * units, whose sum is i * units."""
    q, r = divmod(level, 3)
    return [(q + (r >= 1)) * units, (q + (r == 2)) * units, q * units]


def mobilenetv2_spec(width: float, T: int, num_classes: int) -> BackboneSpec:
    stem = int(BASE_WIDTH * width)
    _, trunk_out = stages(stem, width, T, TRUNK_STAGES)
    last = int(LAST_CHANNEL * width) if width > 1.0 else LAST_CHANNEL

    def make_trunk():
        trunk = nn.Sequential(conv_bn_relu(3, stem, 3, stride=2), *stages(stem, width, T, TRUNK_STAGES)[0])
        init_weights(trunk)
        return trunk

    def deeper_branch(level: int, units: int = 0):
        own, cin = stages(trunk_out, width, T, BRANCH_STAGES, extra_blocks(level, units))
        to_map = [*own, conv_bn_relu(cin, last, 1)]
        body = nn.Sequential(*to_map, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        branch = Branch(body, nn.Linear(last, num_classes), map_layers=len(to_map), pool_layers=len(to_map) + 2)
        init_weights(branch)
        return branch

    return BackboneSpec(make_trunk, lambda: deeper_branch(0), last, trunk_channels=trunk_out, init_linear=init_linear,
                        init_weights=init_weights, deeper_branch=deeper_branch)


# CRD's / SwitOKD's mobile_half: width 0.5, T = 6
BACKBONES.register("mobilenetv2", "mobile_half", "mobilenetv2_x0_5")(partial(mobilenetv2_spec, 0.5, 6))
