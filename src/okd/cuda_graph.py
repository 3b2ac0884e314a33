"""The whole training step as one CUDA graph (``train.cuda_graphs``).

A step of a small CIFAR network is a thousand short kernels; launching them
costs more than running them. ``GraphedStep`` records forward, backward, the
fused SGD, the temporal-mean update and the loss sums of one full batch into a
``torch.cuda.CUDAGraph`` and replays it for every later full batch, after
copying the batch into the graph's static input tensors. Nothing the step
reads from the host can change between replays: the learning rate, the
distillation weight and the temporal-mean decay are device tensors updated in
place (see ``okd.step``), so one capture serves the whole run.

Order of work, so that every batch is trained exactly once:
1. the first ``warmup`` full batches run eagerly on a side stream (cuDNN picks
   its algorithms, the allocator and the optimizer's state settle); the first
   of them runs with ``torch.cuda.set_sync_debug_mode("warn")`` and a step
   that synchronises with the host is never captured;
2. the next full batch is captured (capture executes nothing) and then
   replayed for that batch;
3. every later full batch is a replay. The last, partial batch of an epoch
   runs eagerly with its own shape (the paper's semantics: no dropped images).

Any failure to capture logs one line and the run continues eagerly, which is
always correct. Not used under torchrun (DDP's collectives) or on CPU.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import torch

StepFn = Callable[[List[torch.Tensor], torch.Tensor, int], torch.Tensor]


class GraphedStep:
    def __init__(self, step: StepFn, device: torch.device, log, warmup: int = 3, cuda=torch.cuda):
        # ``cuda``: the torch.cuda API; tests pass a stand-in to check this class's logic on a CPU
        self.step, self.device, self.log, self.cuda = step, device, log, cuda
        self.warmup_left = max(1, warmup)
        self.checked_sync = False
        self.enabled = True
        self.graph = None  # a torch.cuda.CUDAGraph once captured
        self.static_views: List[torch.Tensor] = []
        self.static_labels: Optional[torch.Tensor] = None
        self.static_loss: Optional[torch.Tensor] = None
        self.side = self.cuda.Stream(device)

    def __call__(self, views: List[torch.Tensor], labels: torch.Tensor, epoch: int, full: bool) -> torch.Tensor:
        if not (self.enabled and full):
            return self.step(views, labels, epoch)
        if self.graph is not None and self.fits(views, labels):
            return self.replay(views, labels)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self.eager_on_side_stream(views, labels, epoch)
        if self.graph is None and self.capture(views, labels, epoch):
            return self.replay(views, labels)
        return self.step(views, labels, epoch)

    def fits(self, views: List[torch.Tensor], labels: torch.Tensor) -> bool:
        return labels.shape == self.static_labels.shape and all(
            v.shape == s.shape and v.stride() == s.stride() for v, s in zip(views, self.static_views))

    def eager_on_side_stream(self, views, labels, epoch: int) -> torch.Tensor:
        self.side.wait_stream(self.cuda.current_stream(self.device))
        with self.cuda.stream(self.side):
            if self.checked_sync:
                loss = self.step(views, labels, epoch)
            else:
                loss = self.step_checking_syncs(views, labels, epoch)
        self.cuda.current_stream(self.device).wait_stream(self.side)
        return loss

    def step_checking_syncs(self, views, labels, epoch: int) -> torch.Tensor:
        self.checked_sync = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            previous = self.cuda.get_sync_debug_mode()
            self.cuda.set_sync_debug_mode("warn")
            try:
                loss = self.step(views, labels, epoch)
            finally:
                self.cuda.set_sync_debug_mode(previous)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        if syncs:
            self.disable(f"the step synchronises with the host ({syncs[0]})")
        return loss

    def capture(self, views, labels, epoch: int) -> bool:
        try:
            self.static_views = [v.clone() for v in views]
            self.static_labels = labels.clone()
            graph = self.cuda.CUDAGraph()
            self.cuda.synchronize(self.device)
            with self.cuda.graph(graph):
                self.static_loss = self.step(self.static_views, self.static_labels, epoch)
            self.graph = graph
            self.log.info(f"cuda graphs: the training step is one graph (batch {labels.shape[0]})")
            return True
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            self.disable(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            self.cuda.synchronize(self.device)
            return False

    def replay(self, views, labels) -> torch.Tensor:
        for static, view in zip(self.static_views, views):
            static.copy_(view, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_loss

    def disable(self, why: str) -> None:
        self.enabled, self.graph = False, None
        self.log.info(f"cuda graphs off: {why}; the step runs eagerly (set train.cuda_graphs=false to silence)")
