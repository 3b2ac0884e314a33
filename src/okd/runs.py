"""Reading run directories: which folders are runs, and each run's config and accuracy curve."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import yaml

from .metrics import FILE, read_metrics
from .recipes import COMMON, recipe_label


class ReportError(Exception):
    pass


@dataclass
class Run:
    path: Path
    dataset: str
    backbone: str
    method: str
    seed: int
    epochs: int  # configured
    curve: List[Tuple[int, float]] = field(default_factory=list)  # (epoch, reported accuracy)
    recipe: str = COMMON  # okd.recipes.recipe_label of its config

    @property
    def column(self) -> str:
        """The report's column: the method, and the recipe where it is not the common protocol (an authors'-
        recipe run is never averaged with common-protocol runs of the same method)."""
        return self.method if self.recipe == COMMON else f"{self.method} [{self.recipe}]"

    @property
    def finished(self) -> bool:
        return bool(self.curve) and self.curve[-1][0] >= self.epochs

    @property
    def best(self) -> float:
        return max(v for _, v in self.curve)

    @property
    def last(self) -> float:
        return self.curve[-1][1]


def find_run_dirs(paths: Iterable[str]) -> List[Path]:
    """Run directories under ``paths`` (a run holds config.yaml and metrics.jsonl)."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"'{p}' does not exist")
        candidates = [p] if (p / "config.yaml").is_file() else sorted(c.parent for c in p.rglob("config.yaml"))
        # runs moved aside by --overwrite are history, not results
        found += [c for c in candidates if (c / FILE).is_file() and ".replaced-" not in c.name]
    return list(dict.fromkeys(found))


def read_run(run_dir: Path, metric: str = "reported") -> Optional[Run]:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        model = cfg["model"]["name"]  # a cohort's backbones are joined: resnet32+wrn16_2
        run = Run(run_dir, cfg["data"]["name"], "+".join(model) if isinstance(model, list) else model,
                  cfg["method"]["name"], int(cfg["seed"]),
                  int(cfg["train"]["epochs"]), recipe=recipe_label(cfg))
    except (yaml.YAMLError, KeyError, TypeError, ValueError, OSError):
        print(f"okd-report: skipping '{run_dir}': unreadable config.yaml", file=sys.stderr)
        return None
    curve = {}
    for record in read_metrics(run_dir):
        try:
            curve[int(record["epoch"])] = float(record["summary"][metric]["last"])
        except (ValueError, KeyError, TypeError):
            continue  # an epoch without evaluation
    run.curve = sorted(curve.items())
    return run
