"""Checkpoints: atomic, checksummed writes, and loads that refuse foreign or broken files in one line.

``last.pt`` holds everything needed to continue bit-for-bit (all weights incl.
the temporal mean, optimizer, scheduler, grad scaler, epoch, position inside
the epoch, global step, best metrics, RNG states, resolved config). Before a
new ``last.pt`` replaces the old one, the old one becomes ``last.prev.pt``, so
a damaged ``last.pt`` falls back to the previous good state. ``best.pt`` holds
only the deployable network (the method's reported model) with its metrics
and config: it is what ``okd.load_model`` reads for inference.

File layout: one header line ``okd-checkpoint <version> <sha256> <bytes>``,
then the ``torch.save`` payload. The header lets a truncated or corrupted file
be named as such instead of failing somewhere inside unpickling.

A write that fails removes its temporary files; a full disk is a one-line
``DiskFullError`` (the file, the space needed and free). Temporaries that a
killed process left behind are removed by ``remove_temporaries`` when the next
run takes the run directory's lock. What goes into ``last.pt`` / ``best.pt``,
and when, is ``okd.checkpoint_policy``'s.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import CheckpointError

FORMAT = "okd-checkpoint"
VERSION = 2
MAGIC = FORMAT.encode() + b" "


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


class DiskFullError(CheckpointError):
    """The checkpoint did not fit on its file system; the previous one is intact."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def save_atomic(obj: Dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old or the new file complete; with
    ``keep_previous`` the old one is kept as ``<name>.prev.pt``. A failed write
    removes its temporary files; a full disk is a ``DiskFullError`` naming the
    file and the space it needs.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **obj}, buf)
    payload = buf.getbuffer()
    header = f"{FORMAT} {VERSION} {hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    prev_tmp = path.with_name(f".{path.name}.prev{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            _write(fh, header, payload)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.exists():
            # link (or copy) the old file to <name>.prev first, so that <name> itself never goes missing
            try:
                os.link(path, prev_tmp)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, previous_path(path))
        os.replace(tmp, path)
    except BaseException as exc:
        for leftover in (tmp, prev_tmp):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                f"no space left on the device writing '{path}': it needs {_mb(len(header) + len(payload))} and "
                f"{_mb(free)} are free; free some space (or set output.root elsewhere) and rerun the same command; "
                f"the previous checkpoint is kept") from None
        raise
    _fsync_dir(path.parent)


def _write(fh, header: bytes, payload) -> None:
    fh.write(header)
    fh.write(payload)


def _mb(size: int) -> str:
    return f"{size / 2 ** 20:.1f} MB"


def remove_temporaries(folder: Path) -> List[Path]:
    """Delete the temporary files of writes that never finished (a killed or failed earlier run).

    Only call this while holding the run directory's lock: nobody else writes there then.
    """
    removed = []
    for leftover in Path(folder).glob(".*.pt.*"):
        if TEMPORARY.fullmatch(leftover.name):
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed.append(leftover)
    return removed


TEMPORARY = re.compile(r"\.[^/]+\.pt\.(tmp|prev)\d+")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_payload(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        # not ours: say whether it is some other torch file or nothing loadable at all
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"checkpoint '{path}' is corrupt or not a checkpoint; "
                                  f"delete it or pass another with --resume") from None
        raise CheckpointError(f"'{path}' is not an okd checkpoint; pass a last.pt or best.pt written by okd")
    end = data.find(b"\n")
    try:
        _, version, digest, size = data[:end].decode().split(" ")
        version, size = int(version), int(size)
    except ValueError:
        raise CheckpointError(f"checkpoint '{path}' has a damaged header; delete it or pass another") from None
    if version != VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {version}, this okd reads {VERSION}")
    payload = data[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"checkpoint '{path}' is truncated ({len(payload)} of {size} bytes); "
                              f"delete it or pass another with --resume")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint '{path}' is corrupt (checksum mismatch); delete it or pass another")
    return payload


def load(path: Path, map_location="cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    payload = _read_payload(path)
    try:
        # weights_only: a checkpoint is data, never code to execute
        blob = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}); delete it or pass another") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an okd checkpoint; pass a last.pt or best.pt written by okd")
    return blob


def load_latest(path: Path, map_location="cpu") -> Tuple[Optional[Dict[str, Any]], Optional[Path]]:
    """``path`` if it is good, else its ``.prev`` copy if that is good (with a warning), else an error.

    Returns (None, None) when neither exists.
    """
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        return None, None
    try:
        return load(path, map_location), path
    except CheckpointError as exc:
        if not prev.exists():
            raise
        blob = load(prev, map_location)  # an error here names the previous file too
        print(f"okd: warning: {exc}; continuing from the previous checkpoint '{prev}'", file=sys.stderr)
        return blob, prev
