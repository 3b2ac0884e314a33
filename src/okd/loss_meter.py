"""The epoch's loss sums, on the device (``LossMeter``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .run_state import RunState


class LossMeter:
    """Image-weighted sums of the loss terms of the epoch in progress, kept on the device.

    One float64 vector, updated in place (a CUDA graph of the step adds to the
    same memory on every replay); a step that was not applied adds nothing.
    float64 sums survive the round trip through a mid-epoch checkpoint exactly.
    Adding never reads the device; ``read`` does (at checkpoint and epoch
    boundaries only).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.images = torch.zeros((), dtype=torch.float64, device=device)
        self.zero = torch.zeros((), dtype=torch.float64, device=device)
        # sums loaded before the term names are known, already on the device: the first step
        # builds its vector from them without a host-to-device copy (which would synchronise)
        self.pending: Dict[str, torch.Tensor] = {}

    def load(self, state: RunState) -> None:
        """Start from the epoch-in-progress sums of ``state`` (zero at an epoch boundary)."""
        self.pending = {k: torch.tensor(v, dtype=torch.float64, device=self.device)
                        for k, v in state.loss_sums.items()}
        self.images.fill_(float(state.images))
        if self.sums is not None:
            self.sums.copy_(self._initial(self.names))

    def _initial(self, names: List[str]) -> torch.Tensor:
        if not names:
            return self.zero.new_zeros(0)
        return torch.stack([self.pending.get(n, self.zero) for n in names])

    def add(self, names: List[str], values: torch.Tensor, count: int, skip: torch.Tensor) -> None:
        """``values`` (one per name) of a step on ``count`` images; nothing where ``skip`` is 1."""
        if self.sums is None:
            self.names, self.sums = list(names), self._initial(names)
        applied = skip == 0
        self.sums.add_(torch.where(applied, values.double() * count, 0.0))
        self.images.add_(applied.double() * count)

    def state_tensors(self) -> List[torch.Tensor]:
        """The tensors ``add`` changes in place."""
        return ([self.sums] if self.sums is not None else []) + [self.images]

    def totals(self) -> torch.Tensor:
        """[sum per name..., images] on the device, for one all-reduce."""
        sums = self.sums if self.sums is not None else self._initial(list(self.pending))
        return torch.cat([sums, self.images.reshape(1)])

    def read(self) -> Tuple[Dict[str, float], int]:
        """({name: sum}, images): one read of the device."""
        names = self.names if self.sums is not None else list(self.pending)
        *sums, images = self.totals().tolist()
        return dict(zip(names, sums)), int(round(images))
