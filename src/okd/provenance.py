"""Where a result comes from: the code's commit, torch, and the device by the name torch reports."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Dict

import torch

from .hardware import device_name


@functools.lru_cache(maxsize=1)
def git_commit(short: bool = True) -> str:
    """The commit of the okd checkout, with ``+dirty`` when it has uncommitted changes; "unknown" outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=here,
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (head + ("+dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> Dict[str, str]:
    return {"device": device_name(device), "torch": str(torch.__version__), "commit": git_commit()}
