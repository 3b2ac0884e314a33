"""Command line: ``python main.py`` / ``okd-train``.

``run`` builds everything in one pass: config -> checks -> checkpoint (read,
``okd.run_dir``) -> data -> method -> optimization (``okd.build``) -> restored
state -> run directory (locked, written) -> ``Trainer``. Every user mistake is
one line and exit code 2; nothing is written before every check has passed.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import checkpoint_file, distributed, hardware, runlock
from .build import build_run_method, load_checked_dataset, prepare_runtime
from .checkpoint_policy import CheckpointPolicy, restore
from .config import Config, load_config
from .data.sampling import Sampling
from .data.view_augment import check_views
from .devices import resolve_auto
from .distributed import DistInfo
from .errors import OkdError
from .methods import Method
from .optim import Optimization
from .provenance import git_commit
from .recipes import recipe_label
from .run_dir import find_checkpoint, open_run_dir
from .run_state import RunState
from .signals import Interrupted
from .trainer import Trainer


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2) like every other user error."""

    def error(self, message: str):
        self.exit(2, f"okd: error: {message}; see --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="okd-train",
        description="Train an online knowledge distillation method from a YAML config.",
        epilog="Overrides: dotted key=value pairs, e.g. train.epochs=2 model.name=vgg16 method.temperature=4",
    )
    p.add_argument("--config", "--config_path", dest="config", help="experiment YAML (default: built-in defaults)")
    p.add_argument("--model", help="backbone, same as model.name=...")
    p.add_argument("--method", help="method, same as method.name=...")
    p.add_argument("--save_dir", "--save-dir", dest="save_dir", help="run name under output.root (output.run_name)")
    p.add_argument("--seed", type=int, help="same as seed=...")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="dataset folder (data.root; else $OKD_DATA)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint instead of the run's last.pt")
    p.add_argument("--overwrite", action="store_true", help="move an existing run directory aside and start over")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def flag_overrides(args) -> List[str]:
    out = []
    for flag, key in (("model", "model.name"), ("method", "method.name"), ("save_dir", "output.run_name"),
                      ("seed", "seed"), ("data_root", "data.root"), ("device", "device")):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def run(args) -> int:
    dist = distributed.info_from_env()
    # flags are applied after the dotted overrides: an explicit --model beats model.name=...
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    device = prepare_runtime(cfg, dist)
    run_cfg, chosen = resolve_auto(cfg, device, dist)  # config.yaml keeps what was asked for
    runlock.check_free(cfg.run_dir)  # read-only: a busy run directory is refused before any work
    seen = runlock.fingerprint(cfg.run_dir)
    blob, resume_from = find_checkpoint(cfg, args, run_cfg)
    if blob is not None and not args.resume and blob["epoch"] >= cfg.train.epochs:
        # a finished cell of a table costs nothing to skip: no data is loaded
        if dist.is_main:
            print(f"okd: run '{cfg.run_dir}' already finished ({blob['epoch']}/{cfg.train.epochs} epochs); "
                  f"raise train.epochs to continue or pass --overwrite to start over")
        return 0
    dataset = load_checked_dataset(cfg)
    method = build_run_method(run_cfg, dataset.num_classes, device, image_size=dataset.image_size)
    # the views' recipes and the sampler's batches are refused before the run directory is touched
    if cfg.data.views is not None:
        check_views(cfg.data.views, method.num_views, cfg.method.name)
    Sampling(dataset.train.labels, cfg.train.batch_size, cfg.data.sampler, cfg.data.m_per_class, dist.world_size)
    distributed.init(dist, device)
    optimization = Optimization.build(run_cfg, method, device)
    # the checkpoint is loaded before anything is written: one that does not fit leaves no trace
    state = restore(blob, resume_from, run_cfg, method, optimization) if blob else RunState()
    with open_run_dir(cfg, args.overwrite, dist, state.epoch, seen) as log:
        log_header(log, run_cfg, dataset, method, device, dist, state, resume_from, chosen)
        if state.epoch < cfg.train.epochs:
            checkpoints = CheckpointPolicy(cfg.run_dir if dist.is_main else None, cfg.checkpoint.every_n_steps)
            Trainer(run_cfg, method, dataset, device, optimization, state, checkpoints, log, dist).fit()
        if state.last:
            log.info(state.summary_line())
    return 0


def log_header(log, cfg: Config, dataset, method: Method, device, dist: DistInfo, state: RunState,
               resume_from: Optional[Path], chosen: Sequence[str] = ()) -> None:
    model = ", ".join(f"{k} {v}" for k, v in cfg.model_options().items())
    log.info(f"command: {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    log.info(f"okd run '{cfg.run_dir}' | git {git_commit()} | torch {torch.__version__} | python "
             f"{platform.python_version()} | device {device} ({hardware.device_name(device)}) | threads {torch.get_num_threads()}"
             + (f" | torchrun world size {dist.world_size}" if dist.enabled else ""))
    log.info(f"data {dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test images, "
             f"{dataset.num_classes} classes, {dataset.image_size}px {dataset.augment}, {dataset.pipeline} "
             f"pipeline | model {cfg.model.label}{f' ({model})' if model else ''} | method "
             f"{cfg.method.name} | trainable parameters "
             f"{sum(p.numel() for g in method.parameter_groups() for p in g['params']):,}")
    log.info(f"recipe: {recipe_label(cfg.to_dict())} (docs/methods.md §17)")
    if resume_from is not None:
        where = f", batch {state.batch_in_epoch} of epoch {state.epoch + 1}" if state.batch_in_epoch else ""
        log.info(f"resumed from '{resume_from}' at epoch {state.epoch}{where}, step {state.step}")
    for line in chosen:
        log.info(line)
    if state.epoch >= cfg.train.epochs:
        log.info(f"run already finished ({state.epoch}/{cfg.train.epochs} epochs); "
                 f"raise train.epochs to continue or pass --overwrite to start over")


def main(argv: Optional[List[str]] = None) -> int:
    # intermixed: key=value overrides may come before, between and after flags
    args = build_parser().parse_intermixed_args(argv)
    try:
        return run(args)
    except Interrupted as exc:
        print(f"okd: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except OkdError as exc:
        print(f"okd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in checkpoint_file.NO_SPACE:
            raise
        where = f" writing '{exc.filename}'" if exc.filename else ""
        print(f"okd: error: no space left on the device{where}; free some space and rerun the same command "
              f"(the last checkpoint is kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("okd: interrupted; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
