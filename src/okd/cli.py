"""Command line: ``python main.py`` / ``okd-train``.

Run directories are resumable by rerunning the same command (DINO style): if
``<output.root>/<run_name>/last.pt`` exists the run continues from it, a
finished run is not retrained, and an existing run is only replaced with
``--overwrite`` (which moves it aside, never deletes it). A run directory has
one owner at a time (``okd.runlock``). ``run`` builds everything in one pass:
config -> checks -> checkpoint (read) -> data -> method -> optimization ->
restored state -> run directory (locked, written) -> ``Trainer``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import yaml

from . import checkpoint_file, checkpoint_policy, devices, distributed, runlock
from .provenance import git_commit
from .checkpoint_policy import CheckpointPolicy
from .config import Config, default_tree, dump_yaml, load_config
from .data import load_dataset
from .distributed import DistInfo
from .errors import CheckpointError, ConfigError, DataError, OkdError
from .logger import NullLogger, RunLogger
from .methods import Method, build_method
from .models import backbone_spec, check_input_size, enable_batched_branches
from .models.view_bn import convert_sync_batchnorm
from .run_state import RunState
from .signals import Interrupted
from .step import Optimization
from .trainer import Trainer

# Keys that may change when a run is continued: they do not alter what is computed.
RESUMABLE_KEYS = {"train.epochs", "device", "train.log_every", "train.eval_every", "train.eval_batch_size",
                  "train.threads", "data.root", "data.cache_dir", "data.download", "output.root",
                  "checkpoint.every_n_steps", "train.max_skipped_steps", "train.channels_last", "data.workers",
                  "train.compile", "train.cuda_graphs", "train.batched_branches", "train.sync_every"}


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


def config_differences(old: Dict, new: Dict, resolved: Optional[Dict] = None) -> List[str]:
    """The keys that differ and matter; a key an older okd did not write counts as its default.

    With ``resolved`` (``new`` with its automatic choices made for this device), an
    old value equal to what ``auto`` chose here is no difference: a run written with
    ``train.precision: fp32`` continues under ``auto`` on a device where auto is fp32.
    """
    a, b = flatten(old), flatten(new)
    c = flatten(resolved) if resolved is not None else b
    method = (new.get("method") or {}).get("name")
    if method is not None and (old.get("method") or {}).get("name") == method:
        a = {**flatten(default_tree(method)), **a}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_KEYS and a.get(k) != b.get(k) and a.get(k) != c.get(k)]


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


def move_aside(run_dir: Path) -> None:
    """--overwrite: the old run is kept under another name, never deleted."""
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"okd: moved the existing run to '{aside}' (--overwrite)")


def check_run_dir(cfg: Config, overwrite: bool, resolved: Optional[Config] = None) -> Optional[Path]:
    """Read-only check of the run directory; returns the last.pt to resume from, if any."""
    run_dir = cfg.run_dir
    if overwrite or not run_dir.exists() or not any(p.name != runlock.LOCK_NAME for p in run_dir.iterdir()):
        return None
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise OkdError(f"'{run_dir}' exists and is not an okd run; choose another --save_dir or pass --overwrite")
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        raise OkdError(f"'{saved}' is unreadable; choose another --save_dir or pass --overwrite") from None
    diffs = config_differences(old or {}, cfg.to_dict(), resolved.to_dict() if resolved is not None else None)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise OkdError(f"run directory '{run_dir}' holds a different experiment ({shown}); "
                       f"use another --save_dir or pass --overwrite")
    last = run_dir / "last.pt"
    # load_latest falls back to last.prev.pt when last.pt is missing or damaged
    return last if last.exists() or checkpoint_file.previous_path(last).exists() else None


def run(args) -> int:
    dist = distributed.info_from_env()
    # flags are applied after the dotted overrides: an explicit --model beats model.name=...
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    device = prepare_runtime(cfg, dist)
    run_cfg, chosen = devices.resolve_auto(cfg, device, dist)  # config.yaml keeps what was asked for
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
    distributed.init(dist, device)
    optimization = Optimization.build(run_cfg, method, device)
    # the checkpoint is loaded before anything is written: one that does not fit leaves no trace
    state = checkpoint_policy.restore(blob, resume_from, run_cfg, method, optimization) if blob else RunState()
    with open_run_dir(cfg, args.overwrite, dist, state.epoch, seen) as log:
        log_header(log, run_cfg, dataset, method, device, dist, state, resume_from, chosen)
        if state.epoch < cfg.train.epochs:
            checkpoints = CheckpointPolicy(cfg.run_dir if dist.is_main else None, cfg.checkpoint.every_n_steps)
            Trainer(run_cfg, method, dataset, device, optimization, state, checkpoints, log, dist).fit()
        if state.last:
            log.info(state.summary_line())
    return 0


def prepare_runtime(cfg: Config, dist: DistInfo) -> torch.device:
    """Checks that need the process layout, then the device and CPU threads."""
    if cfg.train.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} (the global batch) is not divisible by the "
                          f"torchrun world size {dist.world_size}; pick a batch size that is")
    device = resolve_device(cfg.device, dist)
    if cfg.train.sync_bn and not (dist.enabled and device.type == "cuda"):
        raise ConfigError("train.sync_bn needs torchrun on CUDA devices; set train.sync_bn=false")
    if cfg.train.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs needs a CUDA device (this run is on {device}); "
                          f"set train.cuda_graphs=null (automatic) or false")
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local_procs))
    if device.type == "cuda":
        use_cuda_device(device)
    return device


def use_cuda_device(device: torch.device) -> None:
    """Make the run's GPU the current one and let cuDNN pick its fastest kernels.

    Everything that uses the *current* device follows the run's: the capture stream of a
    CUDA graph, the DataLoader's pin-memory thread, NCCL, cuBLAS handles. Without it a run
    on cuda:1 (or torchrun rank 1) opens a context on GPU 0 and its graph records nothing.
    Every full batch has one shape, so cuDNN's autotuner (``cudnn.benchmark``) pays once.
    """
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True


def find_checkpoint(cfg: Config, args, resolved: Optional[Config] = None):
    """(checkpoint blob, its path) to continue from: --resume, else the run's last.pt; (None, None) for a new run."""
    if args.resume and not Path(args.resume).is_file():
        raise CheckpointError(f"--resume checkpoint '{args.resume}' does not exist")
    # always check the run directory, so --resume cannot write into another experiment's run
    last = check_run_dir(cfg, args.overwrite, resolved)
    if args.resume:
        return checkpoint_file.load(Path(args.resume)), Path(args.resume)
    if last is not None:
        return checkpoint_file.load_latest(last)
    return None, None


def load_checked_dataset(cfg: Config):
    dataset = load_dataset(cfg.data)
    if cfg.model.num_classes is not None and cfg.model.num_classes != dataset.num_classes:
        raise DataError(f"model.num_classes is {cfg.model.num_classes} but dataset '{cfg.data.name}' has "
                        f"{dataset.num_classes} classes; set model.num_classes={dataset.num_classes} or null")
    if cfg.train.batch_size > len(dataset.train):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} exceeds the {len(dataset.train)} training images")
    return dataset


def build_run_method(cfg: Config, num_classes: int, device: torch.device, image_size: int = 32) -> Method:
    torch.manual_seed(cfg.seed)  # the seed alone fixes the initial weights, on every rank
    spec = backbone_spec(cfg.model.name, num_classes, **cfg.model_options())
    check_input_size(cfg.model.name, spec, image_size, cfg.data.name)
    method = build_method(cfg.method.name, spec, num_classes, cfg.method)
    if cfg.train.sync_bn:
        method = convert_sync_batchnorm(method)  # per-view statistics kept under method.fused_views
    if cfg.train.batched_branches:
        enable_batched_branches(method)  # after any module replacement: it reads the final layers
    method = method.to(device)
    return method.to(memory_format=torch.channels_last) if cfg.train.channels_last else method


@contextlib.contextmanager
def open_run_dir(cfg: Config, overwrite: bool, dist: DistInfo, resume_epoch: int, seen: tuple):
    """Rank 0 locks the run directory, writes config.yaml and opens the logs; yields the logger."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = claim_run_dir(cfg, overwrite, seen)
        except OkdError as exc:
            error = exc
    if not distributed.all_agree(error is None):
        raise error or OkdError("rank 0 could not open the run directory; see its message")
    log = RunLogger(cfg.run_dir, resume_epoch) if dist.is_main else NullLogger()
    try:
        if lock is not None and lock.took_over:
            log.info(f"took over the stale lock of {lock.took_over}, which ended without releasing it")
        yield log
    finally:
        log.close()
        if lock is not None:
            lock.release()


def claim_run_dir(cfg: Config, overwrite: bool, seen: tuple) -> runlock.RunLock:
    """Lock the run directory (moving an old run aside with --overwrite) and write config.yaml.

    ``seen`` is the directory's fingerprint when its checkpoint was read: if another process
    wrote it since, what was read is stale and nothing is written.
    """
    run_dir = cfg.run_dir
    try:
        if overwrite and run_dir.exists() and any(run_dir.iterdir()):
            # lock the old run while moving it aside (only now: a mistake found earlier leaves it untouched)
            old = runlock.RunLock(run_dir).acquire()
            try:
                move_aside(run_dir)
            finally:
                old.release()
        lock = runlock.RunLock(run_dir).acquire()
        if not overwrite and runlock.fingerprint(run_dir) != seen:
            lock.release()
            raise runlock.RunDirBusy(f"run directory '{run_dir}' was written by another process while this one "
                                     f"was starting; rerun the same command to continue from what it wrote")
        checkpoint_file.remove_temporaries(run_dir)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        return lock
    except OSError as exc:
        raise OkdError(f"cannot write the run directory '{run_dir}' ({exc.strerror}); "
                       f"set output.root to a writable folder") from None


def log_header(log, cfg: Config, dataset, method: Method, device, dist: DistInfo, state: RunState,
               resume_from: Optional[Path], chosen: Sequence[str] = ()) -> None:
    model = ", ".join(f"{k} {v}" for k, v in cfg.model_options().items())
    log.info(f"command: {shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])}")
    log.info(f"okd run '{cfg.run_dir}' | git {git_commit()} | torch {torch.__version__} | python "
             f"{platform.python_version()} | device {device} ({devices.device_name(device)}) | threads {torch.get_num_threads()}"
             + (f" | torchrun world size {dist.world_size}" if dist.enabled else ""))
    log.info(f"data {dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test images, "
             f"{dataset.num_classes} classes, {dataset.image_size}px {dataset.augment}, {dataset.pipeline} "
             f"pipeline | model {cfg.model.name}{f' ({model})' if model else ''} | method "
             f"{cfg.method.name} | trainable parameters "
             f"{sum(p.numel() for g in method.parameter_groups() for p in g['params']):,}")
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
