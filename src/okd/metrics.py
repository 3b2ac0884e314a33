"""The metrics file of a run, ``metrics.jsonl``: one JSON record per finished epoch.

Written by ``okd.logger.RunLogger`` (``append``; ``truncate`` on resume drops the
records of epochs the checkpoint does not cover) and read by everything that
reports (``read_metrics``, which returns every version in the current shape).

Format versions (field ``metrics_version``; absent = 1):
1. ``train.loss.<term>`` are the method's raw terms before their weights, so
   they do not add up to ``train.loss.total``;
2. ``train.loss.<term>`` are the weighted terms (ramp-up and coefficients
   applied), summing to ``train.loss.total``; ``train.kd_weight`` is the factor
   on the distillation terms in that epoch (null for methods without KD).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

FILE = "metrics.jsonl"
METRICS_VERSION = 2


def append(path: Path, record: Dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate(path: Path, resume_epoch: int) -> None:
    """Keep only the records of epochs covered by the checkpoint a run resumes from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= resume_epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in kept))


def normalise_record(record: Dict) -> Dict:
    """An epoch record of any ``metrics_version`` in the current shape (see the versions above).

    Version 1 logged the methods' raw loss terms; they move to ``train.loss_unweighted`` so that no
    reader takes them for the weighted terms of version 2, and ``train.kd_weight`` is unknown (None).
    """
    record = dict(record)
    version = int(record.get("metrics_version", 1))
    train = dict(record.get("train") or {})
    if version == 1 and "loss" in train:
        loss = dict(train["loss"])
        train["loss"] = {"total": loss.pop("total")} if "total" in loss else {}
        train["loss_unweighted"] = loss
    train.setdefault("kd_weight", None)
    record["train"], record["metrics_version"] = train, version
    return record


def read_metrics(run_dir: Path) -> List[Dict]:
    """The epoch records of ``metrics.jsonl``, normalised; a torn last line (a killed run) is skipped."""
    out = []
    for line in (Path(run_dir) / FILE).read_text().splitlines():
        try:
            out.append(normalise_record(json.loads(line)))
        except (ValueError, TypeError, AttributeError):
            continue
    return out


def median_img_per_s(records: Sequence[Dict]) -> Optional[float]:
    """The median epoch's training img/s (the first epoch carries warm-up: cuDNN autotuning, graph capture)."""
    speeds = [float(r["train"]["img_per_s"]) for r in records if "train" in r]
    return statistics.median(speeds) if speeds else None
