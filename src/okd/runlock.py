"""One owner per run directory: an advisory lock on ``<run dir>/run.lock``.

The lock is a ``flock`` on the file, so the kernel releases it when its holder
exits in any way, ``kill -9`` included: a lock file whose lock nobody holds is
stale and is simply taken over. The file records who holds it (pid, host,
start time, command) for the error a second process prints. It is never
deleted (deleting it could let two processes lock two different files of the
same name); its content only matters while it is locked. Under torchrun,
rank 0 holds the lock for the whole job.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import OkdError

LOCK_NAME = "run.lock"


class RunDirBusy(OkdError):
    """Another live process trains in this run directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')} "
            f"({info.get('command', '?')})")


def _busy(run_dir: Path, path: Path) -> RunDirBusy:
    return RunDirBusy(f"run directory '{run_dir}' is in use by {_holder(path)}; wait for it to finish, stop it, "
                      f"or use another --save_dir")


def check_free(run_dir: Path) -> None:
    """Read-only: raise ``RunDirBusy`` if a live process holds ``run_dir``'s lock. Writes nothing."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable): nobody we can see holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(run_dir, path) from None
    finally:
        os.close(fd)


def fingerprint(run_dir: Path) -> tuple:
    """Identity (inode, size, mtime) of the files a starting run reads: changes when anyone rewrites them."""
    out = []
    for name in ("config.yaml", "last.pt", "last.prev.pt"):
        try:
            st = (Path(run_dir) / name).stat()
            out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


class RunLock:
    """Held from ``acquire`` until ``release`` (or the process's end, however it ends)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: Optional[int] = None
        self.took_over: Optional[str] = None  # the previous holder, when its lock was stale

    def acquire(self) -> "RunLock":
        """Create the run directory if needed and lock it; ``RunDirBusy`` if a live process holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy(self.run_dir, self.path) from None
            raise
        previous = os.read(fd, 4096)
        if previous.strip():
            self.took_over = _holder(self.path)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # nobody holds it now
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
