"""Command line: ``python main.py`` / ``okd-train``.

Run directories are resumable by rerunning the same command (DINO style): if
``<output.root>/<run_name>/last.pt`` exists the run continues from it, a
finished run is not retrained, and an existing run is only replaced with
``--overwrite`` (which moves it aside, never deletes it).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from . import checkpoint
from .config import Config, dump_yaml, load_config, method_options
from .data import load_dataset
from .errors import CheckpointError, ConfigError, DataError, OkdError
from . import distributed
from .distributed import DistInfo
from .logger import NullLogger, RunLogger
from .methods import build_method
from .models import backbone_spec
from .trainer import Interrupted, Trainer

# Keys that may change when a run is continued: they do not alter what is computed.
RESUMABLE_KEYS = {"train.epochs", "device", "train.log_every", "train.eval_every", "train.eval_batch_size",
                  "train.threads", "data.root", "data.cache_dir", "data.download", "output.root",
                  "checkpoint.every_n_steps", "train.max_skipped_steps", "train.channels_last",
                  "train.compile"}


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


def flatten(tree: Dict, prefix: str = "") -> Dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(old: Dict, new: Dict) -> List[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def resolve_device(name: str, dist: DistInfo = DistInfo()) -> torch.device:
    if dist.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        # torchrun: one GPU per process
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started more processes per node than the {torch.cuda.device_count()} "
                              f"GPU(s) here; lower --nproc_per_node")
        return torch.device("cuda", dist.local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available here; use device=cpu or auto")
        if dist.enabled:
            raise ConfigError(f"device '{name}' under torchrun: use device=cuda (process r takes cuda:LOCAL_RANK)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(name)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def move_aside(run_dir: Path) -> None:
    """--overwrite: the old run is kept under another name, never deleted."""
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"okd: moved the existing run to '{aside}' (--overwrite)")


def check_run_dir(cfg: Config, overwrite: bool) -> Optional[Path]:
    """Read-only check of the run directory; returns the last.pt to resume from, if any."""
    run_dir = cfg.run_dir
    if overwrite or not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise OkdError(f"'{run_dir}' exists and is not an okd run; choose another --save_dir or pass --overwrite")
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        raise OkdError(f"'{saved}' is unreadable; choose another --save_dir or pass --overwrite") from None
    diffs = config_differences(old or {}, cfg.to_dict())
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise OkdError(f"run directory '{run_dir}' holds a different experiment ({shown}); "
                       f"use another --save_dir or pass --overwrite")
    last = run_dir / "last.pt"
    # load_latest falls back to last.prev.pt when last.pt is missing or damaged
    return last if last.exists() or checkpoint.previous_path(last).exists() else None


def run(args) -> int:
    dist = distributed.info_from_env()
    # flags are applied after the dotted overrides: an explicit --model beats model.name=...
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    options = method_options(cfg)
    if cfg.train.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} (the global batch) is not divisible by the "
                          f"torchrun world size {dist.world_size}; pick a batch size that is")
    device = resolve_device(cfg.device, dist)
    if cfg.train.sync_bn and not (dist.enabled and device.type == "cuda"):
        raise ConfigError("train.sync_bn needs torchrun on CUDA devices; set train.sync_bn=false")
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local_procs))
    if args.resume and not Path(args.resume).is_file():
        raise CheckpointError(f"--resume checkpoint '{args.resume}' does not exist")

    # always check the run directory, so --resume cannot write into another experiment's run
    last = check_run_dir(cfg, args.overwrite)
    if args.resume:
        state, resume_from = checkpoint.load(Path(args.resume)), Path(args.resume)
    elif last is not None:
        state, resume_from = checkpoint.load_latest(last)
    else:
        state, resume_from = None, None
    if state is not None and not args.resume and state["epoch"] >= cfg.train.epochs:
        # a finished cell of a table costs nothing to skip: no data is loaded
        if dist.is_main:
            print(f"okd: run '{cfg.run_dir}' already finished ({state['epoch']}/{cfg.train.epochs} epochs); "
                  f"raise train.epochs to continue or pass --overwrite to start over")
        return 0

    dataset = load_dataset(cfg.data)
    if cfg.model.num_classes is not None and cfg.model.num_classes != dataset.num_classes:
        raise DataError(f"model.num_classes is {cfg.model.num_classes} but dataset '{cfg.data.name}' has "
                        f"{dataset.num_classes} classes; set model.num_classes={dataset.num_classes} or null")
    if cfg.train.batch_size > len(dataset.train):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} exceeds the {len(dataset.train)} training images")

    torch.manual_seed(cfg.seed)  # the seed alone fixes the initial weights, on every rank
    method = build_method(cfg.method["name"], backbone_spec(cfg.model.name, dataset.num_classes),
                          dataset.num_classes, options)
    if cfg.train.sync_bn:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method = method.to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)

    distributed.init(dist, device)
    # the trainer is built, and a checkpoint loaded into it, before anything is written:
    # a checkpoint that does not fit leaves no trace
    trainer = Trainer(cfg, method, dataset, device, NullLogger(), dist)
    if state is not None:
        trainer.load_state_dict(state, resume_from)

    run_dir = cfg.run_dir
    if dist.is_main:
        if args.overwrite:
            move_aside(run_dir)  # only now: a mistake found above leaves the old run untouched
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        except OSError as exc:
            raise OkdError(f"cannot write the run directory '{run_dir}' ({exc.strerror}); "
                           f"set output.root to a writable folder") from None
    distributed.barrier()
    log = RunLogger(run_dir, state["epoch"] if state else 0) if dist.is_main else NullLogger()
    trainer.log = log
    try:
        log.info(f"command: {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
        log.info(f"okd run '{run_dir}' | git {git_commit()} | torch {torch.__version__} | python "
                 f"{platform.python_version()} | device {device} | threads {torch.get_num_threads()}"
                 + (f" | torchrun world size {dist.world_size}" if dist.enabled else ""))
        log.info(f"data {dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test images, "
                 f"{dataset.num_classes} classes | model {cfg.model.name} | method {cfg.method['name']} | "
                 f"trainable parameters {sum(p.numel() for g in method.parameter_groups() for p in g['params']):,}")
        if state is not None:
            where = f", batch {trainer.batch_in_epoch} of epoch {trainer.epoch + 1}" if trainer.batch_in_epoch else ""
            log.info(f"resumed from '{resume_from}' at epoch {trainer.epoch}{where}, step {trainer.global_step}")
        if trainer.epoch >= cfg.train.epochs:
            log.info(f"run already finished ({trainer.epoch}/{cfg.train.epochs} epochs); "
                     f"raise train.epochs to continue or pass --overwrite to start over")
        else:
            main_only = (lambda fn: fn) if dist.is_main else (lambda fn: lambda t: None)
            trainer.fit(
                save_last=main_only(lambda t: checkpoint.save_atomic(
                    {**t.state_dict(), "deploy": t.method.deployable_state_dict()}, run_dir / "last.pt",
                    keep_previous=True)),
                save_best=main_only(lambda t: checkpoint.save_atomic(best_payload(t), run_dir / "best.pt")))
        if trainer.last:
            log.info(trainer.summary_line())
    finally:
        log.close()
    return 0


def best_payload(trainer: Trainer) -> Dict:
    state = trainer.state_dict()
    keep = ("epoch", "global_step", "method_name", "model_name", "num_classes", "best", "last", "config")
    return {**{k: state[k] for k in keep}, "deploy": trainer.method.deployable_state_dict()}


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
    except KeyboardInterrupt:
        print("okd: interrupted; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
