"""The m branches of a multi-branch network as one grouped computation (``train.batched_branches``).

m branches of the same architecture are stacked along the channel dimension:
branch j's activations are channels ``[j*C, (j+1)*C)`` of one (B, m*C, H, W)
tensor. Then a convolution of every branch is one convolution with ``groups=m``,
a BatchNorm of every branch is one BatchNorm over m*C channels (each channel
still normalised with its own branch's batch statistics: per-branch semantics
unchanged), a Linear of every branch is one batched matmul, and ReLU, pooling
and dropout act on all branches at once. A small network's step becomes a third
as many, three times larger kernels.

Nothing about the branches' parameters changes: they stay in the m branch
modules (same names, same independent initialisation, same checkpoints and
temporal mean). ``batched_clone`` builds, once, a parallel tree whose
containers are shallow copies of branch 0's (so their own ``forward`` runs
unchanged) and whose leaves read the m branches' current weights on every call
and write the BatchNorm running statistics back to them. The tree is kept
outside the module hierarchy, so it holds no parameters of its own.

Supported layers: Conv2d, BatchNorm2d, Linear, parameter-free layers (ReLU,
pooling, Flatten, Dropout) and containers of them, whose own ``forward`` runs
over the grouped children (right when it treats channels alike, as a residual
sum does). A backbone's block that joins or splits channels declares its
grouped form beside it (``@grouped_form``, as DenseNet's concatenating layer
does in ``models/densenet.py``); the batched-branches tests, run over every
registered backbone, catch one that does not. Anything else raises ``NotImplementedError`` when
batching is enabled, never during training.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

STATELESS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


class Grouped(nn.Module):
    """A leaf over m same-shaped member layers; the members are not submodules (no parameters here)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.__dict__["members"] = list(members)  # plain attribute: outside the module tree

    @property
    def m(self) -> int:
        return len(self.members)


class GroupedConv2d(Grouped):
    def __init__(self, members: Sequence[nn.Conv2d]):
        super().__init__(members)
        c = members[0]
        if c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise NotImplementedError("batched branches: only zero-padded convolutions with numeric padding")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.members[0]
        weight = torch.cat([m.weight for m in self.members])
        bias = torch.cat([m.bias for m in self.members]) if c.bias is not None else None
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups * self.m)


class GroupedBatchNorm2d(Grouped):
    def __init__(self, members: Sequence[nn.BatchNorm2d]):
        super().__init__(members)
        b = members[0]
        if b.momentum is None or not b.affine or not b.track_running_stats:
            raise NotImplementedError("batched branches: BatchNorm needs affine, running stats and a momentum")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms, b = self.members, self.members[0]
        running_mean = torch.cat([m.running_mean for m in ms])
        running_var = torch.cat([m.running_var for m in ms])
        out = F.batch_norm(x, running_mean, running_var, torch.cat([m.weight for m in ms]),
                           torch.cat([m.bias for m in ms]), b.training, b.momentum, b.eps)
        if b.training:  # F.batch_norm updated the concatenated copies: hand each branch its part
            torch._foreach_copy_([m.running_mean for m in ms] + [m.running_var for m in ms],
                                 [*running_mean.chunk(self.m), *running_var.chunk(self.m)])
            torch._foreach_add_([m.num_batches_tracked for m in ms], 1)
        return out


class GroupedLinear(Grouped):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = self.members
        weight = torch.stack([m.weight for m in ms])  # (m, out, in)
        xs = x.reshape(x.shape[0], self.m, -1).transpose(0, 1)  # (m, B, in)
        if ms[0].bias is not None:
            out = torch.baddbmm(torch.stack([m.bias for m in ms]).unsqueeze(1), xs, weight.transpose(1, 2))
        else:
            out = torch.bmm(xs, weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(x.shape[0], -1)  # (B, m*out), branch-major


LEAVES = {nn.Conv2d: GroupedConv2d, nn.BatchNorm2d: GroupedBatchNorm2d, nn.Linear: GroupedLinear}
# a backbone's own block -> its grouped form, declared in the backbone's file with @grouped_form
FORMS: Dict[type, Callable[[Sequence[nn.Module]], nn.Module]] = {}


def grouped_form(block: type):
    """Declare how m copies of ``block`` (a backbone's own layer whose ``forward`` does more than
    call its children, e.g. DenseNet's concatenation) run as one module on channel-stacked input."""
    def decorator(make: Callable[[Sequence[nn.Module]], nn.Module]):
        if block in FORMS or block in LEAVES:
            raise ValueError(f"{block.__name__} has a grouped form already")
        FORMS[block] = make
        return make

    return decorator


def batched_clone(members: Sequence[nn.Module]) -> nn.Module:
    """One module computing all ``members`` (same architecture) on channel-stacked input."""
    first = members[0]
    kind = type(first)
    if any(type(m) is not kind for m in members):
        raise NotImplementedError("batched branches: the branches differ in structure")
    if kind in LEAVES:
        return LEAVES[kind](members)
    if kind in FORMS:
        return FORMS[kind](members)
    if isinstance(first, STATELESS):
        return first  # no state: one instance serves every branch
    has_state = first._parameters or any(b is not None for b in first._buffers.values())
    if has_state or not first._modules or isinstance(first, (_BatchNorm, nn.modules.conv._ConvNd)):
        raise NotImplementedError(f"batched branches: {kind.__name__} is not supported")
    clone = copy.copy(first)  # the container's own forward, over batched children
    clone.__dict__ = dict(first.__dict__)
    clone._parameters, clone._buffers = OrderedDict(), OrderedDict()
    clone._modules = OrderedDict((name, batched_clone([m._modules[name] for m in members]))
                                 for name in first._modules)
    return clone


class BatchedBranches:
    """Runs ``branches`` (``okd.models.Branch``, same architecture) as one computation.

    Inputs are the per-branch trunk outputs (the same tensor m times for a shared
    trunk); outputs are per-branch views of the stacked result.
    """

    def __init__(self, branches: Sequence[nn.Module]):
        first = branches[0]
        self.m, self.map_layers, self.pool_layers = len(branches), first.map_layers, first.pool_layers
        self.body = batched_clone([b.body for b in branches])
        self.fc = GroupedLinear([b.fc for b in branches])

    def stack(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(inputs), dim=1)

    def layers(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for i in range(start, stop):
            x = self.body[i](x)
        return x

    def feature_maps(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return list(self.layers(self.stack(inputs), 0, self.map_layers).chunk(self.m, dim=1))

    def heads(self, maps: Sequence[torch.Tensor]):
        """(features, logits), each a list over branches, from the branches' feature maps."""
        feature = self.layers(self.stack(maps), self.map_layers, self.pool_layers)
        hidden = self.layers(feature, self.pool_layers, len(self.body))
        return list(feature.chunk(self.m, dim=1)), list(self.fc(hidden).chunk(self.m, dim=1))

    def __call__(self, inputs: Sequence[torch.Tensor]):
        x = self.layers(self.stack(inputs), 0, self.map_layers)
        feature = self.layers(x, self.map_layers, self.pool_layers)
        hidden = self.layers(feature, self.pool_layers, len(self.body))
        return list(feature.chunk(self.m, dim=1)), list(self.fc(hidden).chunk(self.m, dim=1))
