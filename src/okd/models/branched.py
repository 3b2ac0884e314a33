"""Backbones as a shared trunk plus independent branches.

Every backbone is described by a ``BackboneSpec``: a factory for the shared
trunk, a factory for one branch (last stage + pooling + classifier) and the
branch's feature width. Methods with several branches call the branch factory
once per branch, so each branch gets its own, independently drawn weights;
independent-network methods build trunk+branch several times. A backbone is
therefore written once, and the split point of spec section 2 lives only here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn


class Branch(nn.Module):
    """Per-branch part: ``body`` maps trunk output to a feature vector, ``fc`` to logits.

    ``body`` is a Sequential whose first ``map_layers`` modules produce the
    branch's last feature map (C x H x W, before pooling); FFL fuses those maps
    and OKDDip pools them for its attention, so the split is recorded here.
    """

    def __init__(self, body: nn.Sequential, fc: nn.Linear, map_layers: int):
        super().__init__()
        if not 0 < map_layers <= len(body):
            raise ValueError(f"map_layers must be in [1, {len(body)}], got {map_layers}")
        self.body = body
        self.fc = fc
        self.map_layers = map_layers

    def forward(self, trunk_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feature = self.body(trunk_out)
        return feature, self.fc(feature)

    def feature_map(self, trunk_out: torch.Tensor) -> torch.Tensor:
        return self.body[:self.map_layers](trunk_out)

    def head(self, feature_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(feature, logits) from the map ``feature_map`` returned."""
        feature = self.body[self.map_layers:](feature_map)
        return feature, self.fc(feature)


@dataclass(frozen=True)
class BackboneSpec:
    make_trunk: Callable[[], nn.Module]
    make_branch: Callable[[], Branch]
    feature_dim: int  # width of a branch's feature vector (and of its last feature map)
    trunk_channels: int  # channels of the shared trunk's output (ONE's gate reads it)


class SingleNet(nn.Module):
    """The deployable network: trunk followed by one branch, returning logits."""

    def __init__(self, trunk: nn.Module, branch: Branch):
        super().__init__()
        self.trunk = trunk
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.trunk(x))[1]

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(feature, logits)."""
        return self.branch(self.trunk(x))


class IndependentNets(nn.Module):
    """``num_nets`` full networks (trunk + branch each), sharing nothing: DML, KDCL, vanilla."""

    def __init__(self, spec: BackboneSpec, num_nets: int):
        super().__init__()
        self.nets = nn.ModuleList([SingleNet(spec.make_trunk(), spec.make_branch()) for _ in range(num_nets)])

    def __len__(self) -> int:
        return len(self.nets)

    def forward_views(self, views: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Logits of network i on view i (a single view may be passed once per network)."""
        return [net(view) for net, view in zip(self.nets, views)]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [net(x) for net in self.nets]


class MultiBranchNet(nn.Module):
    """A shared trunk with ``num_branches`` independently initialised branches."""

    def __init__(self, spec: BackboneSpec, num_branches: int):
        super().__init__()
        self.trunk = spec.make_trunk()
        self.branches = nn.ModuleList([spec.make_branch() for _ in range(num_branches)])
        self.feature_dim = spec.feature_dim

    def enable_fused_views(self) -> None:
        """Let ``forward_views`` run the trunk once over all views (see ``okd.models.view_bn``)."""
        from .view_bn import convert_view_bn

        convert_view_bn(self.trunk)
        self.fused_views = True

    fused_views = False

    def forward_views(self, views: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
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
        outs = [branch(s) for branch, s in zip(self.branches, shared)]
        return [f for f, _ in outs], [z for _, z in outs]

    def forward_branch(self, x: torch.Tensor, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.branches[index](self.trunk(x))

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """One view for all branches: the trunk once, then every branch."""
        shared = self.trunk(x)
        outs = [branch(shared) for branch in self.branches]
        return [f for f, _ in outs], [z for _, z in outs]

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One view for all branches: each branch's last feature map (see ``Branch``)."""
        shared = self.trunk(x)
        return [branch.feature_map(shared) for branch in self.branches]

    def single_state_dict(self, index: int) -> dict:
        """Weights of trunk + branch ``index`` in ``SingleNet``'s key layout."""
        state = {f"trunk.{k}": v for k, v in self.trunk.state_dict().items()}
        state.update({f"branch.{k}": v for k, v in self.branches[index].state_dict().items()})
        return state
