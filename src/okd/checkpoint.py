"""Checkpoints: atomic writes, and loads that refuse foreign or broken files in one line.

``last.pt`` holds everything needed to continue bit-for-bit (all weights incl.
the temporal mean, optimizer, scheduler, epoch, global step, best metrics, RNG
states, resolved config). ``best.pt`` holds only the deployable network (the
method's reported model) with its metrics and config: it is what
``okd.load_model`` reads for inference.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from .errors import CheckpointError

FORMAT = "okd-checkpoint"
VERSION = 1


def save_atomic(obj: Dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, "version": VERSION, **obj}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        # weights_only: a checkpoint is data, never code to execute
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a checkpoint ({type(exc).__name__}); "
            f"delete it or pass another with --resume"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an okd checkpoint; pass a last.pt or best.pt written by okd")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {blob.get('version')}, this okd reads {VERSION}")
    return blob
