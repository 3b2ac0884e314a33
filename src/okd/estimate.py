"""The time estimate of the comparison table's cells, from measured speed (the planner's library part).

``okd.plan`` prints it; ``okd.table`` sizes each Slurm task's time limit from it. A cell's speed is, in
order of preference: its own run's median training img/s (``metrics.jsonl``), that of another seed of
the same backbone and method, or, when asked, a few steps of the method on this device with its
default settings (synthetic images; the real run also evaluates, about 1-3 % more).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import Config, default_run_name
from .errors import ConfigError
from .metrics import FILE as METRICS_FILE
from .metrics import median_img_per_s, read_metrics


@dataclass
class Cell:
    backbone: str
    method: str
    seed: int
    epochs: int
    done: int = 0  # finished epochs
    img_per_s: Optional[float] = None
    source: str = "unknown"  # where img_per_s comes from

    def seconds_left(self, train_images: int) -> Optional[float]:
        if self.done >= self.epochs:
            return 0.0
        if not self.img_per_s:
            return None
        return (self.epochs - self.done) * train_images / self.img_per_s


def run_dir(root: Path, dataset: str, cell: Cell) -> Path:
    return root / default_run_name(dataset, cell.backbone, cell.method, cell.seed)


def measured_speed(path: Path) -> Tuple[int, Optional[float]]:
    """(finished epochs, median training img/s) of a run directory."""
    if not (path / METRICS_FILE).is_file():
        return 0, None
    records = [r for r in read_metrics(path) if "train" in r]
    if not records:
        return 0, None
    return max(int(r["epoch"]) for r in records), median_img_per_s(records)


def probe_speed(cfg: Config, backbone: str, method: str, device: torch.device, num_classes: int,
                steps: int = 6) -> float:
    """Training img/s of ``method`` on ``backbone`` here, with the device's default settings."""
    from .build import build_run_method, build_step
    from .config import config_from_dict
    from .devices import resolve_auto

    tree = cfg.to_dict()
    tree["model"]["name"] = backbone
    tree["method"] = {"name": method}
    run_cfg, _ = resolve_auto(config_from_dict(tree), device)
    model = build_run_method(run_cfg, num_classes, device).train()
    step = build_step(run_cfg, model, device)
    b = run_cfg.train.batch_size
    fmt = torch.channels_last if run_cfg.train.channels_last else torch.contiguous_format
    views = [torch.randn(b, 3, 32, 32, device=device).contiguous(memory_format=fmt) for _ in range(model.num_views)]
    labels = torch.randint(0, num_classes, (b,), device=device)
    for _ in range(2):  # warm-up
        step(views, labels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(views, labels)
    sync()
    return steps * b / (time.perf_counter() - start)


def dataset_size(data_cfg) -> Tuple[int, int]:
    """(training images, classes) of the table's dataset: what its registration declares, else
    counted by loading it (an image folder); ``train_subset`` caps the images."""
    from .data import DATASETS, load_dataset

    meta = DATASETS.meta(data_cfg.name)
    if "train_images" in meta and "num_classes" in meta:
        images, classes = meta["train_images"], meta["num_classes"]
    else:
        dataset = load_dataset(data_cfg)
        images, classes = len(dataset.train), dataset.num_classes
    return (min(images, data_cfg.train_subset) if data_cfg.train_subset else images), classes


def plan(cfg: Config, backbones: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
         measure: bool, device: torch.device, name: Optional[str] = None, num_classes: int = 10) -> List[Cell]:
    root, name = Path(cfg.output.root), name or cfg.data.name
    cells = [Cell(b, m, s, cfg.train.epochs) for b in backbones for m in methods for s in seeds]
    by_pair: Dict[Tuple[str, str], Tuple[float, str]] = {}  # (speed, where it comes from)
    for cell in cells:
        cell.done, cell.img_per_s = measured_speed(run_dir(root, name, cell))
        if cell.img_per_s:
            cell.source = "its run"
            by_pair.setdefault((cell.backbone, cell.method), (cell.img_per_s, f"the seed-{cell.seed} run"))
    for cell in cells:
        pair = (cell.backbone, cell.method)
        if cell.img_per_s is None and pair not in by_pair and measure and cell.done < cell.epochs:
            try:
                by_pair[pair] = (probe_speed(cfg, cell.backbone, cell.method, device, num_classes),
                                 f"measured on {device.type}")
            except ConfigError as exc:  # a method the backbone cannot carry: its run will refuse too
                cell.source = f"refused: {exc}"
                continue
        if cell.img_per_s is None and pair in by_pair:
            cell.img_per_s, cell.source = by_pair[pair]
    return cells


def schedule_seconds(durations: Sequence[float], gpus: int) -> float:
    """Makespan of the longest-first greedy schedule over ``gpus`` queues."""
    queues = [0.0] * max(1, gpus)
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(queues, queues[0] + d)
    return max(queues)


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
