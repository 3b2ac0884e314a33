"""Run outputs: plain-text log, the metrics file (``okd.metrics``), TensorBoard scalars, progress.

All scalars go through ``RunLogger`` under stable names: ``train/loss/<term>``,
``train/kd_weight``, ``train/lr``, ``val/acc/<model>`` (top-1), ``val/acc5/<model>``
(top-5), ``val/summary/<key>``, ``val/diversity/<group>/<disagreement|kl|ensemble_top1|ensemble_gain>``
and ``val/calibration/<model>/<ece|nll|brier>`` (``okd.diagnostics``). The TensorBoard step and the JSON ``epoch``
field are the number of completed epochs (1-based).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import metrics


def text_logger(log_file: Path) -> logging.Logger:
    logger = logging.getLogger(f"okd.run.{log_file}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    fh = logging.FileHandler(log_file)
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    logger.addHandler(sh)
    return logger


class RunLogger:
    def __init__(self, run_dir: Path, resume_epoch: int):
        self.run_dir = Path(run_dir)
        self.text = text_logger(self.run_dir / "log.txt")
        self.metrics_path = self.run_dir / metrics.FILE
        metrics.truncate(self.metrics_path, resume_epoch)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_epoch + 1 if resume_epoch else None)

    def info(self, msg: str) -> None:
        self.text.info(msg)

    def epoch_record(self, record: Dict) -> None:
        epoch = record["epoch"]
        metrics.append(self.metrics_path, record)
        for term, value in record.get("train", {}).get("loss", {}).items():
            self.tb.add_scalar(f"train/loss/{term}", value, epoch)
        if record.get("train", {}).get("kd_weight") is not None:
            self.tb.add_scalar("train/kd_weight", record["train"]["kd_weight"], epoch)
        if "lr" in record:
            self.tb.add_scalar("train/lr", record["lr"], epoch)
        if "img_per_s" in record.get("train", {}):
            self.tb.add_scalar("train/img_per_s", record["train"]["img_per_s"], epoch)
        for kind, tag in (("top1", "acc"), ("top5", "acc5")):
            for model, value in record.get("val", {}).get(kind, {}).items():
                self.tb.add_scalar(f"val/{tag}/{model}", value, epoch)
        for key, value in record.get("summary", {}).items():
            self.tb.add_scalar(f"val/summary/{key}", value["last"], epoch)
        diagnostics = record.get("val", {}).get("diagnostics", {})
        for group, values in diagnostics.get("groups", {}).items():
            for key in ("disagreement", "kl", "ensemble_top1", "ensemble_gain"):
                self.tb.add_scalar(f"val/diversity/{group}/{key}", values[key], epoch)
        for model, values in diagnostics.get("calibration", {}).items():
            for key in ("ece", "nll", "brier"):
                self.tb.add_scalar(f"val/calibration/{model}/{key}", values[key], epoch)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        for h in list(self.text.handlers):
            self.text.removeHandler(h)
            h.close()


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing."""

    is_main = False

    def info(self, msg: str) -> None:
        pass

    def epoch_record(self, record: Dict) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryLogger(NullLogger):
    """Keeps the text lines and epoch records in memory (benchmarks, the preflight): what the
    trainer said, e.g. whether its step became a CUDA graph, without writing a run directory."""

    def __init__(self):
        self.lines: List[str] = []
        self.records: List[Dict] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)

    def epoch_record(self, record: Dict) -> None:
        self.records.append(record)


class Progress:
    """tqdm on a terminal; otherwise a plain line every ``every`` steps."""

    def __init__(self, total: int, desc: str, every: int, log, start: int = 0):
        self.total, self.desc, self.every, self.log = total, desc, max(1, every), log
        self.bar = None
        self.count = start  # steps already done (a run resumed mid-epoch)
        self.first = start
        self.start = time.perf_counter()
        if sys.stderr.isatty() and getattr(log, "is_main", True):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, images: int, loss: Optional[float] = None) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.count % self.every == 0 or self.count == self.total:
            done = images - images * self.first / max(self.count, 1)  # images since this process started
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            extra = f" loss {loss:.4f}" if loss is not None else ""
            self.log.info(f"{self.desc} step {self.count}/{self.total}{extra} {rate:.1f} img/s")

    def wants_loss(self) -> bool:
        """Whether the next update prints a loss (reading it costs a device sync)."""
        nxt = self.count + 1
        return nxt % self.every == 0 or nxt == self.total

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
