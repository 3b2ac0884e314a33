"""When the host reads the device during training, and what it does with what it reads.

Nothing inside a step synchronises with the host: a step records on the device
whether its loss terms were finite (``StepHealth``), and that flag decides, on
the device, whether the fused SGD applies the step and whether the temporal mean
and the loss sums take it. ``SyncPolicy`` owns the rest: which steps are sync
points (every ``train.sync_every`` steps, every checkpoint, a stop signal in a
single process, and the end of an epoch), and the non-finite policy applied
there (``train.nonfinite``: stop the run, or skip up to ``train.max_skipped_steps``).
Under torchrun the ranks agree on both flags with one all-reduce per sync point.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from . import distributed
from .config import Config
from .distributed import DistInfo
from .errors import OkdError
from .run_state import RunState


class StepHealth:
    """Non-finite steps since the last sync point, counted on the device.

    ``record`` returns the step's skip flag (1.0: some value non-finite on some
    rank; the all-reduce keeps every rank's decision the same without a host
    read) and keeps the first bad step's index and values for the message.
    """

    def __init__(self, device: torch.device, dist: DistInfo):
        self.dist = dist
        self.count = torch.zeros((), device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_values: Optional[torch.Tensor] = None

    def record(self, values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        bad = (~torch.isfinite(values)).any().float()
        if self.dist.enabled:
            bad = distributed.all_reduce_max(bad)
        first = (self.count == 0) & (bad > 0)
        if self.first_values is None:
            self.first_values = torch.zeros_like(values)
        self.first_step.copy_(torch.where(first, step, self.first_step))
        self.first_values.copy_(torch.where(first, values, self.first_values))
        self.count.add_(bad)
        return bad

    def state_tensors(self) -> List[torch.Tensor]:
        """The tensors ``record`` changes in place."""
        return [self.count, self.first_step] + ([self.first_values] if self.first_values is not None else [])

    def reset(self) -> None:
        self.count.zero_()
        self.first_step.fill_(-1)


class SyncPolicy:
    """The sync points of a run and the non-finite policy applied at them."""

    def __init__(self, cfg: Config, device: torch.device, log, dist: DistInfo = DistInfo(),
                 checkpoint_due=lambda step: False):
        t = cfg.train
        self.every = t.sync_every or (t.log_every if device.type == "cuda" else 1)
        self.nonfinite, self.max_skipped = t.nonfinite, t.max_skipped_steps
        self.health = StepHealth(device, dist)
        self.device, self.log, self.dist, self.checkpoint_due = device, log, dist, checkpoint_due

    def due(self, step: int, stop_requested: bool) -> bool:
        """Whether the host reads the flags after ``step`` steps: every ``every`` steps, at a checkpoint,
        or (in a single process, where no other rank must agree) on a stop signal."""
        return (step % self.every == 0 or self.checkpoint_due(step)
                or (stop_requested and not self.dist.enabled))

    def check(self, state: RunState, epoch: int, stop_requested: bool, names: List[str]) -> bool:
        """Read the flags (one read; one all-reduce under torchrun), apply the non-finite policy to
        the steps since the last sync point; whether any rank asked to stop."""
        h = self.health
        flags = torch.stack([h.count, h.first_step.float(), torch.tensor(float(stop_requested), device=self.device)])
        if self.dist.enabled:
            flags = distributed.all_reduce_max(flags)
        bad, first, stop = flags.tolist()
        if bad:
            self.nonfinite_steps(int(bad), int(first), state, epoch, names)
            h.reset()
        return bool(stop)

    def nonfinite_steps(self, bad: int, first: int, state: RunState, epoch: int, names: List[str]) -> None:
        """Stop the run (the default), or count the skipped steps up to the limit."""
        values = self.health.first_values.tolist()
        where_bad = [n for n, v in zip(names, values) if not math.isfinite(v)] or ["(on another rank)"]
        batch = first - (state.step - state.batch_in_epoch)  # steps of this epoch before the first bad one
        where = (f"non-finite loss at step {first + 1} (epoch {epoch + 1}, batch {batch + 1}) "
                 f"in term(s) {', '.join(where_bad)}")
        more = f" and {bad - 1} later step(s)" if bad > 1 else ""
        if self.nonfinite == "stop" or state.skipped_steps + bad > self.max_skipped:
            raise OkdError(f"{where}{more}; the last good checkpoint is kept. Lower optim.lr, try "
                           f"train.precision=fp32, or set train.nonfinite=skip")
        state.skipped_steps += bad
        self.log.info(f"{where}{more}: not applied ({state.skipped_steps}/{self.max_skipped} skipped)")
