"""DenseNet-BC-40 (k=12) as in OKDDip's ``densenetd40k12`` (docs/methods.md §2).

Stem conv 3->24 (no BN/ReLU after it); dense blocks of 6 bottleneck layers
(BN-ReLU-1x1 conv to 48, BN-ReLU-3x3 conv to 12); transitions halve channels
and average-pool. The trunk ends after transition 2 (60x8x8); each branch owns
its *own* dense block 3 (OKDDip's multi-branch code shared one block across
branches, a bug we do not port), the final BatchNorm, ReLU, pooling and FC.

We build the standard DenseNet-BC head *with* the final BatchNorm over 132
channels (176,122 / 188,092 parameters); ``final_norm=False`` gives the PCL
reproduction's variant without it (175,858 / 187,828); the config key is
``model.final_norm``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import BACKBONES
from .grouped import batched_clone, grouped_form
from .nets import BackboneSpec, Branch


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
            nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.layers(x)], 1)


@grouped_form(DenseLayer)
class GroupedDenseLayer(nn.Module):
    """DenseNet's layer: the new channels of branch j go after branch j's own input channels."""

    def __init__(self, members: Sequence[DenseLayer]):
        super().__init__()
        self.m = len(members)
        self.layers = batched_clone([d.layers for d in members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.layers(x)
        joined = torch.cat([x.unflatten(1, (self.m, -1)), new.unflatten(1, (self.m, -1))], dim=2).flatten(1, 2)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return joined.contiguous(memory_format=torch.channels_last) if channels_last else joined


def dense_block(cin, num_layers, growth, bn_size):
    return nn.Sequential(*[DenseLayer(cin + i * growth, growth, bn_size) for i in range(num_layers)])


def transition(cin, cout):
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2)
    )


def init_weights(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


@BACKBONES.register("densenet40_12", "densenetd40k12")
def densenet40_12_spec(num_classes: int, growth: int = 12, layers_per_block: int = 6,
                       bn_size: int = 4, final_norm: bool = True) -> BackboneSpec:
    c0 = 2 * growth
    c1 = (c0 + layers_per_block * growth) // 2
    c2 = (c1 + layers_per_block * growth) // 2
    c3 = c2 + layers_per_block * growth

    def make_trunk():
        trunk = nn.Sequential(
            nn.Conv2d(3, c0, 3, padding=1, bias=False),
            dense_block(c0, layers_per_block, growth, bn_size), transition(c0 + layers_per_block * growth, c1),
            dense_block(c1, layers_per_block, growth, bn_size), transition(c1 + layers_per_block * growth, c2),
        )
        init_weights(trunk)
        return trunk

    def deeper_branch(level: int, units: int = 0):
        extra_layers = level * units
        channels = c3 + extra_layers * growth
        head = [nn.BatchNorm2d(channels)] if final_norm else []
        to_map = [dense_block(c2, layers_per_block + extra_layers, growth, bn_size), *head, nn.ReLU(inplace=True)]
        body = nn.Sequential(*to_map, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        branch = Branch(body, nn.Linear(channels, num_classes), map_layers=len(to_map), pool_layers=len(to_map) + 2)
        init_weights(branch)
        return branch

    return BackboneSpec(make_trunk, lambda: deeper_branch(0), c3, trunk_channels=c2, init_weights=init_weights,
                        deeper_branch=deeper_branch)
