"""Assembling a run: config -> runtime and device -> data -> method -> optimization -> trainer.

``cli`` builds a training run with these, and so do the planner's speed probe,
the benchmarks and the preflight, so that what they measure is what a run trains.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .checkpoint_policy import CheckpointPolicy
from .config import Config
from .data import Dataset, load_dataset
from .devices import resolve_device, use_cuda_device
from .distributed import DistInfo
from .errors import ConfigError, DataError
from .logger import MemoryLogger
from .loss_meter import LossMeter
from .methods import Method, build_configured_method
from .models import enable_batched_branches
from .models.view_bn import convert_sync_batchnorm
from .optim import Optimization
from .run_state import RunState
from .step import TrainStep
from .sync import StepHealth
from .trainer import Trainer


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
    method = build_configured_method(cfg, num_classes, image_size)
    if cfg.train.sync_bn:
        method = convert_sync_batchnorm(method)  # per-view statistics kept under method.fused_views
    if cfg.train.batched_branches:
        enable_batched_branches(method)  # after any module replacement: it reads the final layers
    method = method.to(device)
    return method.to(memory_format=torch.channels_last) if cfg.train.channels_last else method


def build_trainer(cfg: Config, method: Method, dataset: Dataset, device: torch.device, log=None,
                  graphed_step: Optional[Callable] = None) -> Trainer:
    """A trainer outside a run directory (benchmarks, the preflight): a fresh state, no checkpoints,
    a ``MemoryLogger`` unless ``log`` is given (it keeps e.g. the graph's capture line)."""
    return Trainer(cfg, method, dataset, device, Optimization.build(cfg, method, device), RunState(),
                   CheckpointPolicy(None), log if log is not None else MemoryLogger(), graphed_step=graphed_step)


def build_step(cfg: Config, method: Method, device: torch.device) -> TrainStep:
    """The training step alone, on the method itself (the planner's speed probe)."""
    return TrainStep(method, method, Optimization.build(cfg, method, device), LossMeter(device),
                     StepHealth(device, DistInfo()), cfg, device)
