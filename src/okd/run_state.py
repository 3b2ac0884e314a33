"""Where a run stands: the counters, the epoch in progress and the best/last summaries.

``RunState`` is everything about progress that a checkpoint must carry for an
exact resume (weights, optimizer and RNG states are saved beside it). Its
``to_dict`` keeps the key names of earlier okd versions, so their ``last.pt``
files resume too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch


@dataclass
class SummaryValue:
    value: float
    epoch: int  # completed epochs when it was measured
    label: str


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps (skipped ones included)
    batch_in_epoch: int = 0  # completed batches of the epoch in progress
    loss_sums: Dict[str, float] = field(default_factory=dict)  # image-weighted term sums, epoch in progress
    images: int = 0  # images trained in the epoch in progress
    seconds: float = 0.0  # training time of the epoch in progress before the last checkpoint
    skipped_steps: int = 0  # non-finite steps skipped (train.nonfinite=skip)
    best: Dict[str, SummaryValue] = field(default_factory=dict)  # summary key -> best value so far
    last: Dict[str, SummaryValue] = field(default_factory=dict)  # summary key -> latest value

    def start_epoch(self) -> None:
        self.batch_in_epoch, self.loss_sums, self.images, self.seconds = 0, {}, 0, 0.0

    def update_summaries(self, summaries: List) -> bool:
        """Record this epoch's summaries; True when the first (the reported model) improved."""
        improved = False
        for i, s in enumerate(summaries):
            self.last[s.key] = SummaryValue(s.value, self.epoch, s.label)
            if s.key not in self.best or s.value > self.best[s.key].value:
                self.best[s.key] = SummaryValue(s.value, self.epoch, s.label)
                improved = improved or i == 0
        return improved

    def summary_record(self) -> Dict[str, Dict]:
        return {k: {"last": v.value, "best": self.best[k].value, "best_epoch": self.best[k].epoch, "label": v.label}
                for k, v in self.last.items()}

    def summary_line(self) -> str:
        parts = [f"{v.label}: last {v.value:.2f}, best {self.best[k].value:.2f} (epoch {self.best[k].epoch})"
                 for k, v in self.last.items()]
        return "final | " + " | ".join(parts)

    def to_dict(self) -> Dict:
        return {"epoch": self.epoch, "global_step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "partial": {"sums": dict(self.loss_sums), "images": self.images, "seconds": self.seconds}
                if self.batch_in_epoch else {},
                "skipped_steps": self.skipped_steps, **self.summaries()}

    def summaries(self) -> Dict:
        """The best and last summaries in checkpoint form (``best.pt`` carries only these and the counters)."""
        return {"best": {k: asdict(v) for k, v in self.best.items()},
                "last": {k: asdict(v) for k, v in self.last.items()}}

    @classmethod
    def from_dict(cls, blob: Dict) -> "RunState":
        partial = blob.get("partial") or {}
        return cls(epoch=blob["epoch"], step=blob["global_step"], batch_in_epoch=blob.get("batch_in_epoch", 0),
                   loss_sums=dict(partial.get("sums", {})), images=partial.get("images", 0),
                   seconds=partial.get("seconds", 0.0), skipped_steps=blob.get("skipped_steps", 0),
                   best={k: SummaryValue(**v) for k, v in blob["best"].items()},
                   last={k: SummaryValue(**v) for k, v in blob["last"].items()})


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
