"""What goes into a run's checkpoints, when they are written, and how a run resumes from one.

``last.pt`` holds everything needed to continue bit-for-bit: the method's whole
state (students, teachers, temporal means), optimizer, schedule, grad scaler,
the ``RunState``, RNG states and the resolved config, plus the deployable
network. ``best.pt`` holds the deployable network at the best epoch of the
reported model, with its metrics and config. Only the main rank writes; the
file format (atomic, checksummed) is ``okd.checkpoint_file``'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from . import checkpoint_file
from .config import Config
from .errors import CheckpointError
from .methods import Method
from .optim import Optimization
from .provenance import environment
from .run_state import RunState


class CheckpointPolicy:
    def __init__(self, run_dir: Optional[Path], every_n_steps: int = 0):
        self.run_dir = run_dir  # None: write nothing (rank > 0, benchmarks)
        self.every_n_steps = every_n_steps

    def due(self, step: int) -> bool:
        """A mid-epoch ``last.pt`` after this many completed steps (``checkpoint.every_n_steps``)."""
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def save_last(self, cfg: Config, method: Method, optimization: Optimization, state: RunState) -> None:
        if self.run_dir is not None:
            payload = {**training_state(cfg, method, optimization, state), "deploy": method.deployable_state_dict(),
                       "deploy_model": method.deployable_backbone}
            checkpoint_file.save_atomic(payload, self.run_dir / "last.pt", keep_previous=True)

    def save_best(self, cfg: Config, method: Method, state: RunState) -> None:
        if self.run_dir is not None:
            payload = {**identity(cfg, method), "epoch": state.epoch, "global_step": state.step,
                       **state.summaries(), "config": cfg.to_dict(), "deploy": method.deployable_state_dict(),
                       "deploy_model": method.deployable_backbone}
            checkpoint_file.save_atomic(payload, self.run_dir / "best.pt")


def identity(cfg: Config, method: Method) -> Dict:
    """What a checkpoint must match to be loaded into a run."""
    return {"method_name": cfg.method.name, "model_name": cfg.model.name, "num_classes": method.num_classes}


def training_state(cfg: Config, method: Method, optimization: Optimization, state: RunState) -> Dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    device = next(method.parameters()).device
    return {**state.to_dict(), **identity(cfg, method), "method_state": method.state_dict(),
            **optimization.state_dict(), "rng": rng, "config": cfg.to_dict(), "torch_version": str(torch.__version__),
            "environment": environment(device)}


def restore(blob: Dict, path: Path, cfg: Config, method: Method, optimization: Optimization) -> RunState:
    """Load a ``last.pt`` into the run's method and optimization, refusing one of another experiment."""
    for key, mine in identity(cfg, method).items():
        if blob.get(key) != mine:
            raise CheckpointError(f"checkpoint '{path}' is for {key.replace('_', ' ')} '{blob.get(key)}', this run "
                                  f"uses '{mine}'; pick a matching checkpoint or another --save_dir")
    try:
        method.load_state_dict(blob["method_state"])
        optimization.load_state_dict(blob)
        state = RunState.from_dict(blob)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model ({type(exc).__name__}); "
                              f"pick a matching checkpoint") from None
    torch.set_rng_state(blob["rng"]["torch"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return state
