"""The training loop. It knows the ``Method`` interface, never a particular method.

Data flows one way: uint8 dataset tensors on the device -> per-epoch draws
(order, crops, flips) -> ``method.forward_train`` -> SGD step ->
``method.after_step`` -> per-epoch evaluation -> logger and checkpoints.

The trainer's state includes its position inside the current epoch, so a
checkpoint written mid-epoch (``checkpoint.every_n_steps``, or on SIGTERM /
SIGINT) continues exactly where it stopped. Under torchrun each process
trains its slice of every global batch (see ``okd.distributed``).
"""
from __future__ import annotations

import inspect
import math
import signal
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed
from .config import Config
from .data import Dataset, EpochDraws, Normalizer, crop_flip, derive_seed
from .distributed import DistInfo
from .errors import OkdError
from .logger import Progress
from .methods import Method

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Interrupted(OkdError):
    """SIGTERM/SIGINT arrived: the current step was finished and last.pt written."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} {where}; last.pt is written: rerun the same command to continue")


def build_optimizer(cfg: Config, param_groups) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(param_groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                           weight_decay=o.weight_decay)


def build_scheduler(cfg: Config, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, after it."""
    s = cfg.schedule
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    milestones = s.milestones if s.name == "multistep" else []
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=s.gamma)


@torch.no_grad()
def evaluate(method: Method, images_u8: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
             batch_size: int, num_classes: int, dist: DistInfo = DistInfo()) -> Dict:
    """Top-1 (and top-5 when there are more than 10 classes) of every model, in percent.

    Under torchrun each rank takes one contiguous shard of the test set and the
    correct counts are summed, so every image is counted exactly once.
    """
    was_training = method.training
    method.eval()
    k = 5 if num_classes > 10 else 1
    shard = torch.arange(labels.numel()).tensor_split(dist.world_size)[dist.rank]
    start, stop = (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)
    names: List[str] = []
    counts: Optional[torch.Tensor] = None  # (models, 2): top-1 and top-k hits
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        x = normalize(images_u8[lo:hi])
        y = labels[lo:hi]
        outputs = method.evaluate_logits(x)
        names = list(outputs)
        hits = []
        for logits in outputs.values():
            hit = logits.topk(k, dim=1).indices.eq(y[:, None])
            hits.append(torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]))
        counts = torch.stack(hits) if counts is None else counts + torch.stack(hits)
    if not names:  # a rank without test images still learns the model names, and joins the sums
        names = list(method.evaluate_logits(normalize(images_u8[:1])).keys())
    if counts is None:
        counts = torch.zeros(len(names), 2, dtype=torch.long, device=labels.device)
    total = torch.tensor([stop - start], device=labels.device)
    distributed.all_reduce_sum(counts)
    distributed.all_reduce_sum(total)
    method.train(was_training)
    n = int(total)
    counts = counts.tolist()
    result = {"top1": {m: 100.0 * c[0] / n for m, c in zip(names, counts)}, "count": n}
    if k == 5:
        result["top5"] = {m: 100.0 * c[1] / n for m, c in zip(names, counts)}
    return result


class Trainer:
    def __init__(self, cfg: Config, method: Method, dataset: Dataset, device: torch.device, log,
                 dist: DistInfo = DistInfo()):
        self.cfg, self.method, self.device, self.log, self.dist = cfg, method, device, log, dist
        self.num_classes = dataset.num_classes
        self.train_images = dataset.train.images.to(device)
        self.train_labels = dataset.train.labels.to(device)
        self.test_images = dataset.test.images.to(device)
        self.test_labels = dataset.test.labels.to(device)
        self.normalize = Normalizer(dataset.mean, dataset.std, device)
        self.train_module = method
        if dist.enabled:
            # the Method's forward is forward_train; the temporal mean has no trainable
            # parameters, so DDP leaves it alone. Buffers are averaged once per epoch instead.
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                              inspect.signature(DistributedDataParallel.__init__).parameters
                              else {"broadcast_buffers": False})  # the older name
            self.train_module = DistributedDataParallel(
                method, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
        if cfg.train.compile:
            self.train_module = torch.compile(self.train_module)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.optimizer = build_optimizer(cfg, method.parameter_groups())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        precision = cfg.train.precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.epoch = 0  # completed epochs
        self.global_step = 0  # completed optimizer steps (skipped ones included)
        self.batch_in_epoch = 0  # completed batches of the epoch in progress
        self.partial: Dict = {}  # loss sums etc. of the epoch in progress, for a mid-epoch resume
        self.skipped_steps = 0
        self.best: Dict[str, Dict] = {}  # summary key -> {"value", "epoch", "label"}
        self.last: Dict[str, Dict] = {}  # summary key -> {"value", "epoch", "label"}
        self.stop_signal: Optional[int] = None
        self.save_last: Callable[["Trainer"], None] = lambda t: None
        self.save_best: Callable[["Trainer"], None] = lambda t: None

    # ------------------------------------------------------------ state

    def state_dict(self) -> Dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "partial": self.partial,
            "skipped_steps": self.skipped_steps,
            "method_name": self.cfg.method["name"],
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "method_state": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best": self.best,
            "last": self.last,
            "rng": rng,
            "config": self.cfg.to_dict(),
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: Dict, path) -> None:
        for key, mine in (("method_name", self.cfg.method["name"]), ("model_name", self.cfg.model.name),
                          ("num_classes", self.num_classes)):
            if state.get(key) != mine:
                raise checkpoint.CheckpointError(
                    f"checkpoint '{path}' is for {key.replace('_', ' ')} '{state.get(key)}', this run uses "
                    f"'{mine}'; pick a matching checkpoint or another --save_dir"
                )
        try:
            self.method.load_state_dict(state["method_state"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise checkpoint.CheckpointError(
                f"checkpoint '{path}' does not fit this model ({type(exc).__name__}); pick a matching checkpoint"
            ) from None
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.batch_in_epoch, self.partial = state.get("batch_in_epoch", 0), state.get("partial", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.best, self.last = state["best"], state["last"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # ------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.stop_signal = signum

    def _install_signal_handlers(self):
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. embedded use): leave signals alone
                pass
        return previous

    # ------------------------------------------------------------ one step

    def epoch_draws(self, epoch: int):
        """The epoch's order, crop offsets and flips, moved to the device once per epoch."""
        draws = EpochDraws(self.train_labels.numel(), self.method.num_views, self.cfg.data.pad, self.cfg.data.flip,
                           self.cfg.seed, epoch)
        return tuple(t.to(self.device) for t in (draws.order, draws.offsets, draws.flips))

    def make_inputs(self, b: int, order, offsets, flips):
        """This rank's share of global batch ``b``: (one normalised view per method view, labels)."""
        n, bs = self.train_labels.numel(), self.cfg.train.batch_size
        pos = torch.arange(b * bs, min((b + 1) * bs, n), device=self.device)
        if pos.numel() < self.dist.world_size:
            return None
        pos = pos.tensor_split(self.dist.world_size)[self.dist.rank]
        idx = order[pos]
        images, labels = self.train_images[idx], self.train_labels[idx]
        inputs = [self.normalize(crop_flip(images, offsets[v, pos], flips[v, pos], self.cfg.data.pad)).contiguous(
            memory_format=self.memory_format) for v in range(self.method.num_views)]
        return inputs, labels

    def train_step(self, inputs: List[torch.Tensor], labels: torch.Tensor, epoch: int):
        """Forward, backward and (unless the loss is non-finite and skipped) the optimizer step."""
        cast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                else nullcontext())
        with cast:
            loss, terms = self.train_module(inputs, labels, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # one flag for every rank: non-finite loss anywhere, or a stop signal anywhere
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
        flags = torch.stack([(~torch.isfinite(values)).any().float(),
                             torch.tensor(float(self.stop_signal is not None), device=values.device)])
        bad, stop = distributed.all_reduce_max(flags).tolist()
        if bad:
            names = [n for n, v in zip(["total", *terms], values.tolist()) if not math.isfinite(v)] or ["(on another rank)"]
            where = (f"non-finite loss at step {self.global_step + 1} (epoch {epoch + 1}, batch "
                     f"{self.batch_in_epoch + 1}) in term(s) {', '.join(names)}")
            if self.cfg.train.nonfinite == "stop" or self.skipped_steps >= self.cfg.train.max_skipped_steps:
                raise OkdError(f"{where}; the last good checkpoint is kept. Lower optim.lr, try "
                               f"train.precision=fp32, or set train.nonfinite=skip")
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.log.info(f"{where}: step skipped ({self.skipped_steps}/{self.cfg.train.max_skipped_steps})")
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step(self.global_step)
        return loss.detach(), terms, bad, stop

    # ------------------------------------------------------------ loop

    def train_epoch(self, epoch: int) -> Dict:
        cfg, method, dist = self.cfg, self.method, self.dist
        method.train()
        first_batch = self.batch_in_epoch
        if first_batch == 0:
            # Everything random in this epoch derives from (seed, epoch, rank): resuming at
            # an epoch boundary replays it exactly (mid-epoch, the saved RNG state does).
            torch.manual_seed(derive_seed(cfg.seed, epoch, 1 + dist.rank))
            self.partial = {"sums": {}, "images": 0, "seconds": 0.0}
        n, bs = self.train_labels.numel(), cfg.train.batch_size
        order, offsets, flips = self.epoch_draws(epoch)
        num_batches = math.ceil(n / bs)  # the last partial batch is kept (split over ranks if possible)
        # float64 sums survive the round trip through a mid-epoch checkpoint exactly
        sums: Dict[str, torch.Tensor] = {k: torch.tensor(v, dtype=torch.float64, device=self.device)
                                         for k, v in self.partial["sums"].items()}
        progress = Progress(num_batches, f"epoch {epoch + 1}/{cfg.train.epochs}", cfg.train.log_every, self.log,
                            start=first_batch)
        start = time.perf_counter()
        every = cfg.checkpoint.every_n_steps
        for b in range(first_batch, num_batches):
            batch = self.make_inputs(b, order, offsets, flips)
            if batch is None:
                continue  # too few images left to give every rank one
            inputs, labels = batch
            loss, terms, bad, stop = self.train_step(inputs, labels, epoch)
            self.global_step += 1
            self.batch_in_epoch = b + 1
            if not bad:
                count = labels.numel()
                self.partial["images"] += count
                for name, value in {"total": loss, **terms}.items():
                    sums[name] = sums.get(name, 0) + value.detach().double() * count
            progress.update(min((b + 1) * bs, n), float(loss) if progress.wants_loss() else None)
            if stop or (every and self.global_step % every == 0):
                self.partial["sums"] = {k: float(v) for k, v in sums.items()}
                self.partial["seconds"] += time.perf_counter() - start
                start = time.perf_counter()
                self.save_last(self)
                if stop:
                    progress.close()
                    raise Interrupted(self.stop_signal or signal.SIGTERM,
                                      f"at epoch {epoch + 1}, batch {b + 1}/{num_batches}")
        progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self.partial["seconds"] + time.perf_counter() - start
        names = sorted(sums)
        totals = torch.tensor([float(sums[k]) for k in names] + [float(self.partial["images"])], dtype=torch.float64,
                              device=self.device)
        totals = distributed.all_reduce_sum(totals).tolist()
        images = max(totals[-1], 1.0)
        losses = {k: v / images for k, v in zip(names, totals[:-1])}
        self.batch_in_epoch, self.partial = 0, {}
        if dist.enabled:
            distributed.average_buffers(method)
        return {"loss": losses, "img_per_s": totals[-1] / max(seconds, 1e-9), "seconds": seconds}

    def evaluate(self) -> Dict:
        return evaluate(self.method, self.test_images, self.test_labels, self.normalize,
                        self.cfg.train.eval_batch_size, self.num_classes, self.dist)

    def fit(self, save_last, save_best) -> None:
        cfg = self.cfg
        self.save_last, self.save_best = save_last, save_best
        previous = self._install_signal_handlers()
        try:
            for epoch in range(self.epoch, cfg.train.epochs):
                self._fit_epoch(epoch)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fit_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        lr = self.optimizer.param_groups[0]["lr"]
        train_stats = self.train_epoch(epoch)
        self.scheduler.step()
        self.epoch = epoch + 1
        record = {"epoch": self.epoch, "step": self.global_step, "lr": lr, "train": train_stats}
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        if self.dist.enabled:
            in_sync = distributed.states_in_sync(self.method)
            record["distributed"] = {"world_size": self.dist.world_size, "ranks_in_sync": in_sync}
            if not in_sync:
                self.log.info("warning: the ranks' weights differ (a non-deterministic kernel?); rank 0's are saved")
        if self.epoch % cfg.train.eval_every == 0 or self.epoch == cfg.train.epochs:
            val = self.evaluate()
            record["val"] = val
            improved = self._update_summaries(val["top1"])
            record["summary"] = {k: {"last": self.last[k]["value"], "best": self.best[k]["value"],
                                     "best_epoch": self.best[k]["epoch"], "label": self.last[k]["label"]}
                                 for k in self.last}
            self.log.info(self._epoch_line(record))
        else:
            improved = False
            self.log.info(f"epoch {self.epoch}/{cfg.train.epochs} loss {train_stats['loss'].get('total', float('nan')):.4f} "
                          f"lr {lr:.4g} {train_stats['img_per_s']:.1f} img/s")
        self.log.epoch_record(record)
        if improved:
            self.save_best(self)
        self.save_last(self)
        if self.stop_signal is not None:  # arrived during evaluation: the epoch is saved, stop here
            raise Interrupted(self.stop_signal, f"after epoch {self.epoch}")

    def _update_summaries(self, top1: Dict[str, float]) -> bool:
        summaries = self.method.summary_metrics(top1)
        improved = False
        for i, s in enumerate(summaries):
            self.last[s.key] = {"value": s.value, "epoch": self.epoch, "label": s.label}
            if s.key not in self.best or s.value > self.best[s.key]["value"]:
                self.best[s.key] = {"value": s.value, "epoch": self.epoch, "label": s.label}
                improved = improved or i == 0  # the first summary selects best.pt
        return improved

    def _epoch_line(self, record: Dict) -> str:
        top1 = record["val"]["top1"]
        accs = " ".join(f"{m} {v:.2f}" for m, v in top1.items())
        return (f"epoch {record['epoch']}/{self.cfg.train.epochs} loss {record['train']['loss'].get('total', float('nan')):.4f} "
                f"lr {record['lr']:.4g} {record['train']['img_per_s']:.1f} img/s | val top-1: {accs}")

    def summary_line(self) -> str:
        parts = [f"{v['label']}: last {v['value']:.2f}, best {self.best[k]['value']:.2f} (epoch {self.best[k]['epoch']})"
                 for k, v in self.last.items()]
        return "final | " + " | ".join(parts)
