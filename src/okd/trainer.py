"""The training loop. It knows the ``Method`` contract, never a particular method.

Data flows one way: the dataset -> ``BatchStream`` (resident uint8 split:
per-epoch draws, crop/flip, normalise, this rank's slice) or ``StreamBatches``
(image files decoded and augmented in DataLoader workers) -> ``TrainStep`` (forward,
loss = sum of the method's weighted terms, backward, optimizer,
``method.after_step``, ``LossMeter``; one CUDA graph with
``train.cuda_graphs``) -> per-epoch evaluation -> logger and
``CheckpointPolicy``. One step is four hops: ``fit`` -> ``train_epoch`` ->
``step`` -> the method's ``forward_train`` -> its loss functions. The host reads
the device only at the sync points that ``okd.sync.SyncPolicy`` decides.
Progress lives in a ``RunState``, which includes the position inside the
current epoch, so a checkpoint written mid-epoch (``checkpoint.every_n_steps``,
or on SIGTERM/SIGINT) continues exactly where it stopped. Under torchrun each process trains its slice of every global batch
(see ``okd.distributed``).
"""
from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch

from . import distributed
from .checkpoint_policy import CheckpointPolicy
from .config import Config
from .cuda_graph import GraphedStep
from .data import Dataset, derive_seed, training_batches
from .distributed import DistInfo
from .errors import DataError
from .evaluate import test_set
from .logger import Progress
from .loss_meter import LossMeter
from .methods import Method
from .metrics import METRICS_VERSION
from .optim import Optimization
from .run_state import RunState
from .signals import Interrupted, StopSignals
from .step import TrainStep, training_module, use_cuda_graphs
from .sync import SyncPolicy


class Trainer:
    def __init__(self, cfg: Config, method: Method, dataset: Dataset, device: torch.device,
                 optimization: Optimization, state: RunState, checkpoints: CheckpointPolicy, log,
                 dist: DistInfo = DistInfo(), graphed_step: Optional[Callable] = None):
        # graphed_step(train_step, device, log) -> a GraphedStep: the preflight passes one over a
        # stand-in for torch.cuda on a CPU; by default a real one where train.cuda_graphs holds
        self.cfg, self.method, self.device, self.dist, self.log = cfg, method, device, dist, log
        self.optimization, self.state, self.checkpoints = optimization, state, checkpoints
        self.stream = training_batches(dataset, method.num_views, cfg, device, dist)
        self.test = test_set(dataset, cfg, device, dist)
        self.meter = LossMeter(device)
        self.sync = SyncPolicy(cfg, device, log, dist, checkpoint_due=checkpoints.due)
        self.train_step = TrainStep(training_module(method, cfg, device, dist), method, optimization, self.meter,
                                    self.sync.health, cfg, device, self.stream.batch_size)
        if graphed_step is None and use_cuda_graphs(cfg, device, dist, log):
            graphed_step = GraphedStep
        self.graphed = graphed_step(self.train_step, device, log) if graphed_step is not None else None
        # step(views, labels): the TrainStep, or the CUDA graph that wraps it
        self.step = self.graphed if self.graphed is not None else self.train_step

    def fit(self) -> None:
        with StopSignals() as signals:
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                lr = self.optimization.lr
                train = self.train_epoch(epoch, signals)
                self.end_epoch(epoch, lr, train, signals)

    def train_epoch(self, epoch: int, signals: StopSignals) -> Dict:
        state = self.state
        self.method.train()
        # the epoch's distillation factor, a device tensor the step reads (no Python int in the step)
        self.method.kd_scale.fill_(self.method.options.kd_scale(epoch) or 0.0)
        if state.batch_in_epoch == 0:
            # Everything random in this epoch derives from (seed, epoch, rank): resuming at
            # an epoch boundary replays it exactly (mid-epoch, the saved RNG state does).
            torch.manual_seed(derive_seed(self.cfg.seed, epoch, 1 + self.dist.rank))
            state.start_epoch()
        self.meter.load(state)
        self.train_step.start(state)
        progress = Progress(len(self.stream), f"epoch {epoch + 1}/{self.cfg.train.epochs}", self.cfg.train.log_every,
                            self.log, start=state.batch_in_epoch)
        clock = time.perf_counter()
        try:
            for batch in self.stream.epoch(epoch, start=state.batch_in_epoch):
                loss = self.step(batch.views, batch.labels)
                state.step, state.batch_in_epoch = state.step + 1, batch.index + 1
                images_done = min((batch.index + 1) * self.stream.batch_size, self.stream.num_images)
                progress.update(images_done, float(loss) if progress.wants_loss() else None)
                if self.sync.due(state.step, signals.received is not None):
                    clock = self.sync_point(epoch, signals, clock, progress)
        except DataError as exc:  # an unreadable image on the streaming path: keep the epoch's progress
            progress.close()
            self.keep_progress(epoch, clock)
            raise DataError(f"{exc}, then rerun the same command to continue from batch "
                            f"{state.batch_in_epoch + 1} of epoch {epoch + 1}") from None
        # the epoch's end is always a sync point (under torchrun the last global batch may yield nothing here)
        clock = self.sync_point(epoch, signals, clock, progress, save_due=False)
        progress.close()
        return self.epoch_totals(clock)

    def sync_point(self, epoch: int, signals: StopSignals, clock: float, progress: Progress,
                   save_due: bool = True) -> float:
        """Read the step flags (the non-finite policy acts here), write a due checkpoint, stop when asked."""
        state = self.state
        stop = self.sync.check(state, epoch, signals.received is not None, self.train_step.names)
        if stop or (save_due and self.checkpoints.due(state.step)):
            clock = self.save_mid_epoch(clock)
        if stop:
            progress.close()
            raise Interrupted(signals.received or signal.SIGTERM,
                              f"at epoch {epoch + 1}, batch {state.batch_in_epoch}/{len(self.stream)}")
        return clock

    def keep_progress(self, epoch: int, clock: float) -> None:
        """Checkpoint the steps done so far (checked first) before an error ends a single-process run.
        Under torchrun the other ranks wait in a collective, so the last regular checkpoint stands."""
        if self.dist.enabled or self.state.batch_in_epoch == 0:
            return
        self.sync.check(self.state, epoch, False, self.train_step.names)
        self.save_mid_epoch(clock)

    def save_mid_epoch(self, clock: float) -> float:
        now = time.perf_counter()
        self.state.loss_sums, self.state.images = self.meter.read()
        self.state.seconds += now - clock
        self.checkpoints.save_last(self.cfg, self.method, self.optimization, self.state)
        return now

    def epoch_totals(self, clock: float) -> Dict:
        """The epoch's mean loss terms over all ranks' images and its speed; closes the epoch's bookkeeping."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self.state.seconds + time.perf_counter() - clock
        names = self.meter.names or list(self.meter.pending)
        totals = distributed.all_reduce_sum(self.meter.totals()).tolist()  # one read for all terms
        images = max(totals[-1], 1.0)
        self.state.start_epoch()
        if self.dist.enabled:
            distributed.average_buffers(self.method)
        return {"loss": {k: v / images for k, v in sorted(zip(names, totals[:-1]))},
                "img_per_s": totals[-1] / max(seconds, 1e-9), "seconds": seconds}

    def end_epoch(self, epoch: int, lr: float, train: Dict, signals: StopSignals) -> None:
        self.optimization.scheduler.step()
        state = self.state
        state.epoch = epoch + 1
        record = {"metrics_version": METRICS_VERSION, "epoch": state.epoch, "step": state.step, "lr": lr,
                  "train": {**train, "kd_weight": self.method.options.kd_scale(epoch)}}
        if state.skipped_steps:
            record["skipped_steps"] = state.skipped_steps
        if self.dist.enabled:
            record["distributed"] = self.check_ranks_in_sync()
        improved = False
        if state.epoch % self.cfg.train.eval_every == 0 or state.epoch == self.cfg.train.epochs:
            clock = time.perf_counter()
            with self.graphed.memory() if self.graphed is not None else nullcontext():
                record["val"] = self.test.evaluate(self.method)
            record["eval_seconds"] = time.perf_counter() - clock
            improved = state.update_summaries(self.method.summary_metrics(record["val"]["top1"]))
            record["summary"] = state.summary_record()
        self.log.info(epoch_line(record, self.cfg.train.epochs))
        self.log.epoch_record(record)
        if improved:
            self.checkpoints.save_best(self.cfg, self.method, state)
        self.method.after_epoch(epoch)  # after best.pt (the weights just tested), before last.pt
        self.checkpoints.save_last(self.cfg, self.method, self.optimization, state)
        if signals.received is not None:  # arrived during evaluation: the epoch is saved, stop here
            raise Interrupted(signals.received, f"after epoch {state.epoch}")

    def check_ranks_in_sync(self) -> Dict:
        in_sync = distributed.states_in_sync(self.method)
        if not in_sync:
            self.log.info("warning: the ranks' weights differ (a non-deterministic kernel?); rank 0's are saved")
        return {"world_size": self.dist.world_size, "ranks_in_sync": in_sync}


def epoch_line(record: Dict, epochs: int) -> str:
    train = record["train"]
    line = (f"epoch {record['epoch']}/{epochs} loss {train['loss'].get('total', float('nan')):.4f} "
            f"lr {record['lr']:.4g} {train['img_per_s']:.1f} img/s")
    if "val" in record:
        line += " | val top-1: " + " ".join(f"{m} {v:.2f}" for m, v in record["val"]["top1"].items())
    return line
