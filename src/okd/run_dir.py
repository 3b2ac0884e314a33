"""The run-directory policy: one experiment per directory, resumed by rerunning the same command.

If ``<output.root>/<run_name>/last.pt`` exists the run continues from it (DINO
style), a finished run is not retrained, and an existing run is only replaced
with ``--overwrite`` (which moves it aside, never deletes it). A directory that
holds another experiment (a config differing in a key outside
``RESUMABLE_KEYS``) is refused. A run directory has one owner at a time
(``okd.runlock``); nothing is written before every check has passed.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from . import checkpoint_file, distributed, runlock
from .config import Config, default_tree, dump_yaml
from .distributed import DistInfo
from .errors import CheckpointError, OkdError
from .logger import NullLogger, RunLogger

# Keys that may change when a run is continued: they do not alter what is computed.
RESUMABLE_KEYS = {"train.epochs", "device", "train.log_every", "train.eval_every", "train.eval_batch_size",
                  "train.threads", "data.root", "data.cache_dir", "data.download", "output.root",
                  "checkpoint.every_n_steps", "train.max_skipped_steps", "train.channels_last", "data.workers",
                  "train.compile", "train.cuda_graphs", "train.batched_branches", "train.sync_every"}


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
