"""Backbones as a shared trunk plus independent branches.

Every backbone is described by a ``BackboneSpec``: a factory for the shared
trunk, a factory for one branch (last stage + pooling + classifier) and the
branch's feature width. Methods with several branches call the branch factory
once per branch, so each branch gets its own, independently drawn weights;
independent-network methods build trunk+branch several times. A backbone is
therefore written once, and the split point of docs/methods.md §2 lives only here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .grouped import BatchedBranches


class BranchOutput(NamedTuple):
    feature: torch.Tensor  # the pooled last feature map, (B, feature_dim)
    logits: torch.Tensor  # (B, num_classes)


class BranchOutputs(NamedTuple):
    """Every branch's output, one list entry per branch."""
    features: List[torch.Tensor]
    logits: List[torch.Tensor]

    @classmethod
    def of(cls, outputs: Sequence[BranchOutput]) -> "BranchOutputs":
        return cls([o.feature for o in outputs], [o.logits for o in outputs])


class Branch(nn.Module):
    """Per-branch part of a backbone, in three recorded steps of one ``body`` Sequential.

    ``body[:map_layers]`` gives the branch's last feature map (C x H x W; FFL fuses
    these maps, OKDDip pools them), ``body[map_layers:pool_layers]`` pools it to the
    feature vector (C = ``feature_dim``; PCL's peer ensemble reads it), and
    ``body[pool_layers:]`` holds any hidden classifier layers (VGG's two FC layers)
    before ``fc`` gives the logits. The single Sequential keeps the parameter names
    of checkpoints written before the split was recorded.
    """

    def __init__(self, body: nn.Sequential, fc: nn.Linear, map_layers: int, pool_layers: Optional[int] = None):
        super().__init__()
        pool_layers = len(body) if pool_layers is None else pool_layers
        if not 0 < map_layers <= pool_layers <= len(body):
            raise ValueError(f"need 0 < map_layers <= pool_layers <= {len(body)}, got {map_layers}, {pool_layers}")
        self.body = body
        self.fc = fc
        self.map_layers = map_layers
        self.pool_layers = pool_layers

    def _layers(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for i in range(start, stop):
            x = self.body[i](x)
        return x

    def feature_map(self, trunk_out: torch.Tensor) -> torch.Tensor:
        return self._layers(trunk_out, 0, self.map_layers)

    def head(self, feature_map: torch.Tensor) -> BranchOutput:
        """The pooled feature and the logits from the map ``feature_map`` returned."""
        feature = self._layers(feature_map, self.map_layers, self.pool_layers)
        hidden = self._layers(feature, self.pool_layers, len(self.body))
        return BranchOutput(feature, self.fc(hidden))

    def forward(self, trunk_out: torch.Tensor) -> BranchOutput:
        return self.head(self.feature_map(trunk_out))


def no_init(module: nn.Module) -> None:
    """PyTorch's default initialisation, left as it is."""


@dataclass(frozen=True)
class BackboneSpec:
    make_trunk: Callable[[], nn.Module]
    make_branch: Callable[[], Branch]
    feature_dim: int  # width of a branch's pooled feature (= channels of its last feature map)
    trunk_channels: int  # channels of the shared trunk's output (ONE's gate reads it)
    # how this backbone initialises a classifier Linear; methods apply it to the layers they add
    init_linear: Callable[[nn.Linear], None] = no_init
    # the backbone's whole-model init loop (convs, norms, linears); a method applies it to modules it adds
    # where the authors' model-wide loop reaches them too (AHBF's fusion modules)
    init_weights: Callable[[nn.Module], None] = no_init
    input_size: Optional[int] = None  # the only image side the network takes (None: any)
    name: str = ""  # the registered backbone name (``backbone_spec`` sets it)
    # AHBF's deeper branches: ``deeper_branch(level, units)`` is the branch of hierarchy level ``level`` with
    # ``units`` more units (blocks, layers or convs) per level, placed by the backbone's rule (the last stage,
    # or MobileNetV2's stage-by-stage order); None: not built. ``deeper_branch(0, u)`` is ``make_branch()``;
    # a deeper branch's last map may have more channels (DenseNet)
    deeper_branch: Optional[Callable[[int, int], Branch]] = None


def single_state_dict(trunk: nn.Module, branch: nn.Module) -> dict:
    """Weights of ``trunk`` + ``branch`` in ``SingleNet``'s key layout (the deployable network)."""
    state = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    state.update({f"branch.{k}": v for k, v in branch.state_dict().items()})
    return state


class SingleNet(nn.Module):
    """The deployable network: trunk followed by one branch, returning logits."""

    def __init__(self, trunk: nn.Module, branch: Branch):
        super().__init__()
        self.trunk = trunk
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.trunk(x)).logits


def cohort_specs(spec: Union[BackboneSpec, Sequence[BackboneSpec]], count: int) -> List[BackboneSpec]:
    """One spec per network: a single backbone repeated, or a cohort's list (its length checked)."""
    if isinstance(spec, BackboneSpec):
        return [spec] * count
    if len(spec) != count:
        raise ValueError(f"a cohort of {len(spec)} backbones for {count} networks")
    return list(spec)


class IndependentNets(nn.Module):
    """``num_nets`` full networks (trunk + branch each), sharing nothing: DML, KDCL. ``spec`` may be a
    list, one backbone per network (a heterogeneous cohort)."""

    def __init__(self, spec: Union[BackboneSpec, Sequence[BackboneSpec]], num_nets: int):
        super().__init__()
        self.nets = nn.ModuleList([SingleNet(s.make_trunk(), s.make_branch()) for s in cohort_specs(spec, num_nets)])

    def __len__(self) -> int:
        return len(self.nets)

    def forward_views(self, views: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Logits of network i on view i."""
        return [net(view) for net, view in zip(self.nets, views)]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [net(x) for net in self.nets]


class MultiBranchNet(nn.Module):
    """A shared trunk with ``num_branches`` independently initialised branches.

    Every way of running the branches goes through ``branch_outputs`` / ``heads``,
    which run them one after another or, with ``enable_batched_branches``, as one
    grouped computation (``okd.models.grouped``; same results within float rounding).
    """

    fused_views = False

    def __init__(self, spec: BackboneSpec, num_branches: int):
        super().__init__()
        self.trunk = spec.make_trunk()
        self.branches = nn.ModuleList([spec.make_branch() for _ in range(num_branches)])
        self.feature_dim = spec.feature_dim
        self.__dict__["batched"] = None  # a BatchedBranches, kept outside the module tree

    def enable_fused_views(self) -> None:
        """Let ``forward_views`` run the trunk once over all views (see ``okd.models.view_bn``)."""
        from .view_bn import convert_view_bn

        convert_view_bn(self.trunk)
        self.fused_views = True

    def enable_batched_branches(self) -> None:

        self.__dict__["batched"] = BatchedBranches(list(self.branches))

    def branch_outputs(self, inputs: Sequence[torch.Tensor]) -> BranchOutputs:
        """Branch j on ``inputs[j]`` (its view's trunk output, or the shared one)."""
        if self.batched is not None:
            return BranchOutputs(*self.batched(inputs))
        return BranchOutputs.of([branch(x) for branch, x in zip(self.branches, inputs)])

    def heads(self, maps: Sequence[torch.Tensor]) -> BranchOutputs:
        """Branch j's pooled feature and logits from its last feature map ``maps[j]``."""
        if self.batched is not None:
            return BranchOutputs(*self.batched.heads(maps))
        return BranchOutputs.of([branch.head(fm) for branch, fm in zip(self.branches, maps)])

    def forward_views(self, views: Sequence[torch.Tensor]) -> BranchOutputs:
        """Branch j sees view j, with per-view BatchNorm statistics in the trunk.

        Reference order: the trunk once per view. Fused: once over the views
        concatenated along the batch, BatchNorm still per view.
        """
        if self.fused_views and len(views) > 1 and self.training:
            from .view_bn import set_views

            set_views(self.trunk, len(views))
            try:
                shared = self.trunk(torch.cat(list(views))).chunk(len(views))
            finally:
                set_views(self.trunk, 1)
        else:
            shared = [self.trunk(v) for v in views]
        return self.branch_outputs(shared)

    def forward(self, x: torch.Tensor) -> BranchOutputs:
        """One view for all branches: the trunk once, then every branch."""
        return self.on_shared(self.trunk(x))

    def on_shared(self, shared: torch.Tensor) -> BranchOutputs:
        """Every branch on one trunk output."""
        return self.branch_outputs([shared] * len(self.branches))

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One view for all branches: each branch's last feature map (see ``Branch``)."""
        shared = self.trunk(x)
        if self.batched is not None:
            return self.batched.feature_maps([shared] * len(self.branches))
        return [branch.feature_map(shared) for branch in self.branches]

    def single_state_dict(self, index: int) -> dict:
        """Weights of trunk + branch ``index`` in ``SingleNet``'s key layout."""
        return single_state_dict(self.trunk, self.branches[index])
