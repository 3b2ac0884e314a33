"""VGG-16 for CIFAR as in OKDDip's ``model_cifar/vgg.py`` (docs/methods.md §2).

13 conv(bias)+BN+ReLU layers, 3-layer classifier. The trunk ends after the
first 10 convs (512x2x2); a branch is the last 3 convs, the final max-pool and
the classifier. The branch's pooled feature is the flattened 512-d conv output
(what OKDDip's attention and PCL's peer ensemble read), not the hidden FC
activation. Dropout (``model.dropout``) defaults per method: 0.5 in the
multi-branch VGG of ONE, CL and OKDDip, 0.0 elsewhere (the single-network
``vgg.py`` and the PCL reproduction).
"""
from __future__ import annotations

from torch import nn

from . import BACKBONES
from .nets import BackboneSpec, Branch

TRUNK_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
BRANCH_CFG = [512, 512, 512, "M"]


def conv_layers(cfg, cin):
    layers = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1, bias=True), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return layers


def init_linear(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)


def init_weights(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_linear(m)


@BACKBONES.register("vgg16")
def vgg16_spec(num_classes: int, dropout: float = 0.0) -> BackboneSpec:
    def make_trunk():
        trunk = nn.Sequential(*conv_layers(TRUNK_CFG, 3))
        init_weights(trunk)
        return trunk

    def deeper_branch(level: int, units: int = 0):
        convs = conv_layers([512] * (level * units) + BRANCH_CFG, 512)  # -> 512 x 1 x 1, the branch's last feature map
        body = nn.Sequential(
            *convs, nn.Flatten(),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        branch = Branch(body, nn.Linear(512, num_classes), map_layers=len(convs), pool_layers=len(convs) + 1)
        init_weights(branch)
        return branch

    # five 2x2 max-pools must leave the 512x1x1 map the classifier reads
    return BackboneSpec(make_trunk, lambda: deeper_branch(0), 512, trunk_channels=512, init_linear=init_linear,
                        init_weights=init_weights, input_size=32, deeper_branch=deeper_branch)
