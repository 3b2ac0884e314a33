"""The training loop. It knows the ``Method`` interface, never a particular method.

Data flows one way: uint8 dataset tensors on the device -> per-epoch draws
(order, crops, flips) -> ``method.forward_train`` -> SGD step ->
``method.after_step`` -> per-epoch evaluation -> logger and checkpoints.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List

import torch

from . import checkpoint
from .config import Config
from .data import Dataset, EpochDraws, Normalizer, crop_flip, derive_seed
from .errors import OkdError
from .logger import Progress, RunLogger
from .methods import Method


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
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
             batch_size: int, num_classes: int) -> Dict[str, Dict[str, float]]:
    """Top-1 (and top-5 when there are more than 10 classes) of every model, in percent."""
    was_training = method.training
    method.eval()
    k = 5 if num_classes > 10 else 1
    correct1: Dict[str, torch.Tensor] = {}
    correct5: Dict[str, torch.Tensor] = {}
    for start in range(0, labels.numel(), batch_size):
        x = normalize(images_u8[start:start + batch_size])
        y = labels[start:start + batch_size]
        for name, logits in method.evaluate_logits(x).items():
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1[name] = correct1.get(name, 0) + hit[:, 0].sum()
            correct5[name] = correct5.get(name, 0) + hit.any(dim=1).sum()
    method.train(was_training)
    n = labels.numel()
    result = {"top1": {m: 100.0 * float(c) / n for m, c in correct1.items()}}
    if k == 5:
        result["top5"] = {m: 100.0 * float(c) / n for m, c in correct5.items()}
    return result


class Trainer:
    def __init__(self, cfg: Config, method: Method, dataset: Dataset, device: torch.device, log: RunLogger):
        self.cfg, self.method, self.device, self.log = cfg, method, device, log
        self.num_classes = dataset.num_classes
        self.train_images = dataset.train.images.to(device)
        self.train_labels = dataset.train.labels.to(device)
        self.test_images = dataset.test.images.to(device)
        self.test_labels = dataset.test.labels.to(device)
        self.normalize = Normalizer(dataset.mean, dataset.std, device)
        self.optimizer = build_optimizer(cfg, method.parameter_groups())
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.epoch = 0  # completed epochs
        self.global_step = 0  # completed optimizer steps
        self.best: Dict[str, Dict] = {}  # summary key -> {"value", "epoch", "label"}
        self.last: Dict[str, Dict] = {}  # summary key -> {"value", "epoch", "label"}

    # ------------------------------------------------------------ state

    def state_dict(self) -> Dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "method_name": self.cfg.method["name"],
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "method_state": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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
        except (KeyError, RuntimeError, ValueError) as exc:
            raise checkpoint.CheckpointError(
                f"checkpoint '{path}' does not fit this model ({type(exc).__name__}); pick a matching checkpoint"
            ) from None
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.last = state["best"], state["last"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # ------------------------------------------------------------ loop

    def train_epoch(self, epoch: int) -> Dict:
        cfg, method = self.cfg, self.method
        method.train()
        # Everything random in this epoch derives from (seed, epoch): resuming
        # at an epoch boundary replays it exactly.
        torch.manual_seed(derive_seed(cfg.seed, epoch, 1))
        n, bs, views = self.train_labels.numel(), cfg.train.batch_size, method.num_views
        draws = EpochDraws(n, views, cfg.data.pad, cfg.data.flip, cfg.seed, epoch)
        # one transfer per epoch, not one per batch
        order, offsets, flips = (t.to(self.device) for t in (draws.order, draws.offsets, draws.flips))
        num_batches = math.ceil(n / bs)  # the last partial batch is kept
        sums: Dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        progress = Progress(num_batches, f"epoch {epoch + 1}/{cfg.train.epochs}", cfg.train.log_every, self.log)
        start = time.perf_counter()
        for b in range(num_batches):
            pos = slice(b * bs, (b + 1) * bs)
            idx = order[pos]
            images, labels = self.train_images[idx], self.train_labels[idx]
            inputs = [self.normalize(crop_flip(images, offsets[v, pos], flips[v, pos], cfg.data.pad))
                      for v in range(views)]
            loss, terms = method.forward_train(inputs, labels, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            method.after_step(self.global_step)
            self.global_step += 1
            count = labels.numel()
            total += loss.detach() * count
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * count
            progress.update(min((b + 1) * bs, n), float(loss.detach()) if progress.wants_loss() else None)
        progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        losses = {name: float(v) / n for name, v in sums.items()}
        losses["total"] = float(total) / n
        return {"loss": losses, "img_per_s": n / seconds, "seconds": seconds}

    def evaluate(self) -> Dict:
        return evaluate(self.method, self.test_images, self.test_labels, self.normalize,
                        self.cfg.train.eval_batch_size, self.num_classes)

    def fit(self, save_last, save_best) -> None:
        cfg = self.cfg
        for epoch in range(self.epoch, cfg.train.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            train_stats = self.train_epoch(epoch)
            self.scheduler.step()
            self.epoch = epoch + 1
            if not all(math.isfinite(v) for v in train_stats["loss"].values()):
                raise OkdError(f"non-finite training loss in epoch {self.epoch} ({train_stats['loss']}); "
                               f"lower optim.lr or check the data; last good checkpoint kept")
            record = {"epoch": self.epoch, "step": self.global_step, "lr": lr, "train": train_stats}
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
                self.log.info(f"epoch {self.epoch}/{cfg.train.epochs} loss {train_stats['loss']['total']:.4f} "
                              f"lr {lr:.4g} {train_stats['img_per_s']:.1f} img/s")
            self.log.epoch_record(record)
            if improved:
                save_best(self)
            save_last(self)

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
        return (f"epoch {record['epoch']}/{self.cfg.train.epochs} loss {record['train']['loss']['total']:.4f} "
                f"lr {record['lr']:.4g} {record['train']['img_per_s']:.1f} img/s | val top-1: {accs}")

    def summary_line(self) -> str:
        parts = [f"{v['label']}: last {v['value']:.2f}, best {self.best[k]['value']:.2f} (epoch {self.best[k]['epoch']})"
                 for k, v in self.last.items()]
        return "final | " + " | ".join(parts)
