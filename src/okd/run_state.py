"""Where a run stands: the counters, the epoch in progress and the best/last summaries.

``RunState`` is everything about progress that a checkpoint must carry for an
exact resume (weights, optimizer and RNG states are saved beside it). Its
``to_dict`` keeps the key names of earlier okd versions, so their ``last.pt``
files resume too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List


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
