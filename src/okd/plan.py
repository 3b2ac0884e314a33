"""How long the comparison table takes: cells, their state, and a time estimate from measured speed.

    python -m okd.plan --config configs/cifar100.yml --seeds "0 1 2" --gpus 4 [--measure] [overrides...]

Every cell is (backbone, method, seed) with the config's epochs. A cell's speed
is, in order of preference: its own run's median training img/s
(``metrics.jsonl``), that of another seed of the same backbone and method, or,
with ``--measure``, a few steps of the method on this device with its default
settings (synthetic images; the real run also evaluates, about 1-3 % more).
Remaining time = remaining epochs x (train images / img/s). The table's
estimate on G GPUs is the longest-processing-time schedule of the cells' times
over G queues, which is what ``run_table.sh`` does (one process per GPU taking
the next cell from a shared queue).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from .config import load_config
from .devices import set_up_device
from .errors import OkdError
from .estimate import (  # noqa: F401  (the planner's names, re-exported)
    Cell,
    dataset_size,
    hours,
    measured_speed,
    plan,
    probe_speed,
    run_dir,
    schedule_seconds,
)
from .paper import ALL_METHODS, BACKBONE_ROWS, TABLE_METHODS


def report(cells: List[Cell], dataset: str, train_images: int, gpus: int) -> str:
    lines = [f"{'backbone':<15} {'method':<8} {'seed':>4} {'epochs':>9} {'img/s':>9} {'left':>10}  speed from"]
    known, unknown = [], 0
    for c in cells:
        left = c.seconds_left(train_images)
        if left is None:
            unknown += 1
        else:
            known.append(left)
        lines.append(f"{c.backbone:<15} {c.method:<8} {c.seed:>4} {c.done:>4}/{c.epochs:<4} "
                     f"{(f'{c.img_per_s:,.0f}' if c.img_per_s else '?'):>9} "
                     f"{(hours(left) if left is not None else '?'):>10}  {c.source if c.done < c.epochs else 'done'}")
    todo = sum(1 for c in cells if c.done < c.epochs)
    lines.append(f"{dataset}: {len(cells)} cells, {todo} to run; {hours(sum(known))} of training left on one device, "
                 f"about {hours(schedule_seconds(known, gpus))} on {gpus} in parallel"
                 + (f"; {unknown} cell(s) without a measured speed (pass --measure)" if unknown else ""))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="okd-plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the table's dataset config, e.g. configs/cifar100.yml")
    p.add_argument("--name", help="the table's name in run directories <name>_<backbone>_<method>_seed<seed> "
                                  "(default: data.name)")
    p.add_argument("--seeds", default="0", help='space-separated seeds, e.g. "0 1 2"')
    p.add_argument("--methods", default=" ".join(TABLE_METHODS),
                   help="space-separated methods (default: PCL's table); 'all': also those after PCL")
    p.add_argument("--backbones", default=" ".join(BACKBONE_ROWS))
    p.add_argument("--gpus", type=int, default=0, help="GPUs the table is spread over (default: all here, else 1)")
    p.add_argument("--measure", action="store_true", help="time a few steps of cells without a measured speed")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for a run")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        device = set_up_device(args.device)  # the speed probe runs as a training run would
        gpus = args.gpus or max(1, torch.cuda.device_count())
        images, classes = dataset_size(cfg.data)
        methods = ALL_METHODS if args.methods.strip() == "all" else args.methods.split()
        cells = plan(cfg, args.backbones.split(), methods, [int(s) for s in args.seeds.split()],
                     args.measure, device, args.name, classes)
        print(report(cells, args.name or cfg.data.name, images, gpus))
        return 0
    except OkdError as exc:
        print(f"okd-plan: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
