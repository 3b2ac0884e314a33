"""The whole training step as one CUDA graph (``train.cuda_graphs``).

A step of a small CIFAR network is a thousand short kernels; launching them
costs more than running them. ``GraphedStep`` records forward, backward, the
fused SGD, the temporal-mean update and the loss sums of one full batch into a
``torch.cuda.CUDAGraph`` and replays it for every later full batch, after
copying the batch into the graph's static input tensors. Nothing the step
reads from the host can change between replays: the learning rate, the
distillation ramp-up and the temporal-mean decay are device tensors updated in
place (see ``okd.step``), so one capture serves the whole run.

Order of work, so that every batch is trained exactly once:
1. the first ``warmup`` full batches run eagerly on a side stream (cuDNN picks
   its algorithms, the allocator and the optimizer's state settle); the first
   of them runs with ``torch.cuda.set_sync_debug_mode("warn")`` and a step
   that synchronises with the host is never captured;
2. the next full batch is captured (capture executes nothing), the graph is
   replayed once from the saved state, the state is put back and the batch is
   trained by the eager step; the graph is trusted only if its replay agreed
   with the eager step (``TOLERANCE``). This catches a graph that recorded
   nothing (an empty capture warns only) or something else than the step;
3. every later full batch is a replay. The last, partial batch of an epoch
   runs eagerly with its own shape (the paper's semantics: no dropped images),
   and so does evaluation, both on the capture's side stream and allocating from
   the graph's memory pool where torch has ``MemPool`` (the forward's activations
   reuse the step's memory instead of reserving their own beside it; backward
   runs in autograd's own thread, whose allocations the pool does not take).

The capture is made by hand rather than through ``torch.cuda.graph``: on the run's
device and side stream (``torch.cuda.graph`` takes the *current* device's), with
``capture_error_mode="thread_local"`` (the DataLoader's pin-memory thread allocates
pinned memory while the main thread captures; the default "global" mode turns that
into an invalidated capture), without emptying the pinned-memory cache, and so that
a failed ``capture_end`` still leaves the capture stream. Any failure logs one line,
restores what the step had changed and continues eagerly, which is always correct.
Not used under torchrun (DDP's collectives) or on CPU (``okd.cuda_standin`` plays
``torch.cuda`` there for the tests and the preflight).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import List, Optional, Sequence

import torch

# a replay must reproduce the eager step's change of every group of state to within this fraction;
# a graph that recorded nothing (or the step twice) is off by 1 or more, float reordering by ~1e-6
TOLERANCE = 0.05


class StepSnapshot:
    """Copies of every tensor a step changes, and the RNG states, to put a step's state back."""

    def __init__(self, tensors: Sequence[torch.Tensor], rng):
        self.tensors = [t.detach().clone() for t in tensors]
        self.rng = rng

    def restore_into(self, tensors: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for live, saved in zip(tensors, self.tensors):
                live.copy_(saved)


@torch.no_grad()
def relative_gap(replayed: Sequence[torch.Tensor], before: Sequence[torch.Tensor],
                 eager: Sequence[torch.Tensor], groups: Sequence[str]) -> float:
    """How far a replay's result is from the eager step's, relative to what the eager step changed.

    Per group of tensors (weights, buffers, optimizer state, loss sums, ...):
    ||replayed - eager|| / ||eager - before||, the largest over the groups, so that a
    small group is not drowned by a large one. Integer tensors (counters) must be
    equal: inf otherwise, as for a group the eager step left unchanged and the
    replay did not; nan for non-finite state.
    """
    num, den = {}, {}
    for r, b, e, g in zip(replayed, before, eager, groups):
        if not e.is_floating_point():
            if not torch.equal(r, e):
                return math.inf
            continue
        num[g] = num.get(g, 0.0) + (r.double() - e.double()).pow(2).sum()
        den[g] = den.get(g, 0.0) + (e.double() - b.double()).pow(2).sum()
    worst = 0.0
    for g in num:
        n, d = float(num[g]), float(den[g])
        if not (math.isfinite(n) and math.isfinite(d)):
            return math.nan
        if n > 0:
            worst = max(worst, math.sqrt(n / d) if d > 0 else math.inf)
    return worst


class GraphedStep:
    def __init__(self, step, device: torch.device, log, warmup: int = 3, cuda=torch.cuda,
                 tolerance: float = TOLERANCE):
        # ``step``: an ``okd.step.TrainStep`` (called, and asked for its ``state_tensors``);
        # ``cuda``: the torch.cuda API; tests pass a stand-in to check this class's logic on a CPU
        self.step, self.device, self.log, self.cuda, self.tolerance = step, device, log, cuda, tolerance
        self.warmup_left = max(1, warmup)
        self.checked_sync = False
        self.enabled = True
        self.graph = None  # a torch.cuda.CUDAGraph once captured and checked
        self.pool = None  # the graph's memory pool (a torch.cuda.MemPool where torch has one)
        self.pool_for_eager = hasattr(cuda, "MemPool") and hasattr(cuda, "use_mem_pool")
        self.pool_error: Optional[str] = None  # why eager work could not enter the pool (the preflight fails on it)
        self.static_views: List[torch.Tensor] = []
        self.static_labels: Optional[torch.Tensor] = None
        self.static_loss: Optional[torch.Tensor] = None
        self.replay_gap: Optional[float] = None  # the check replay's relative gap to the eager step
        self.replays = 0
        self.off_reason: Optional[str] = None
        with cuda.device(device):
            self.side = cuda.Stream(device)

    def __call__(self, views: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        full = labels.shape[0] == self.step.batch_size  # the epoch's last batch may be smaller: eager
        if not (self.enabled and full):
            with self.memory():
                return self.step(views, labels)
        if self.graph is not None and self.fits(views, labels):
            return self.replay(views, labels)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self.eager_on_side_stream(views, labels)
        if self.graph is None:
            return self.capture_and_check(views, labels)
        with self.memory():  # a full batch of another layout than the captured one
            return self.step(views, labels)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def fits(self, views: List[torch.Tensor], labels: torch.Tensor) -> bool:
        return labels.shape == self.static_labels.shape and all(
            v.shape == s.shape and v.stride() == s.stride() for v, s in zip(views, self.static_views))

    @contextlib.contextmanager
    def memory(self):
        """Eager work once there is a graph (partial batches, evaluation): on the capture's side stream and
        allocating from the graph's pool, whose free blocks belong to that stream, so that it reuses the
        step's activation memory instead of reserving its own beside it."""
        if self.graph is None:
            yield
            return
        current = self.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        try:
            with self.cuda.stream(self.side), self.pool_allocation():
                yield
        finally:
            current.wait_stream(self.side)

    @contextlib.contextmanager
    def pool_allocation(self):
        with contextlib.ExitStack() as stack:
            if self.pool is not None and self.pool_for_eager:
                try:
                    stack.enter_context(self.cuda.use_mem_pool(self.pool, self.device))
                except Exception as exc:  # noqa: BLE001 - only the memory saving is lost
                    self.pool_for_eager = False
                    self.pool_error = f"{type(exc).__name__}: {first_line(exc)}"
                    self.log.info(f"cuda graphs: eager work cannot share the graph's memory pool "
                                  f"({type(exc).__name__}: {first_line(exc)}); it allocates beside it")
            yield

    def eager_on_side_stream(self, views, labels) -> torch.Tensor:
        self.side.wait_stream(self.cuda.current_stream(self.device))
        with self.cuda.stream(self.side):
            if self.checked_sync:
                loss = self.step(views, labels)
            else:
                loss = self.step_checking_syncs(views, labels)
        self.cuda.current_stream(self.device).wait_stream(self.side)
        return loss

    def step_checking_syncs(self, views, labels) -> torch.Tensor:
        self.checked_sync = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            previous = self.cuda.get_sync_debug_mode()
            self.cuda.set_sync_debug_mode("warn")
            try:
                loss = self.step(views, labels)
            finally:
                self.cuda.set_sync_debug_mode(previous)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        if syncs:
            self.disable(f"the step synchronises with the host ({syncs[0]})")
        return loss

    # ------------------------------------------------------------ capture and its check

    def rng_state(self):
        return torch.get_rng_state(), self.cuda.get_rng_state(self.device)

    def set_rng_state(self, rng) -> None:
        torch.set_rng_state(rng[0])
        self.cuda.set_rng_state(rng[1], self.device)

    def capture_and_check(self, views, labels) -> torch.Tensor:
        """Capture the step on this batch, replay it once, then train the batch eagerly from the same
        state; keep the graph only if the replay agreed. Returns the eager step's loss."""
        named = self.step.state_tensors()
        tensors = [t for group in named.values() for t in group]
        groups = [name for name, group in named.items() for _ in group]
        before = StepSnapshot(tensors, self.rng_state())
        self.static_views = [v.clone() for v in views]
        self.static_labels = labels.clone()
        try:
            graph = self.record()
            self.set_rng_state(before.rng)
            graph.replay()
            self.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            self.restore(before, tensors)
            self.disable(f"capture failed ({type(exc).__name__}: {first_line(exc)})")
            return self.step(views, labels)
        replayed = [t.detach().clone() for t in tensors]
        self.restore(before, tensors)
        loss = self.step(views, labels)  # the batch is trained once, by the eager step
        gap = relative_gap(replayed, before.tensors, tensors, groups)
        del replayed, before
        if not gap <= self.tolerance:  # nan too
            self.disable(f"a replay of the captured step disagrees with the eager step (relative gap {gap:.3g} "
                         f"> {self.tolerance}; an empty or incomplete capture)")
            return loss
        self.graph, self.replay_gap = graph, gap
        self.log.info(f"cuda graphs: the training step is one graph (batch {labels.shape[0]}; its replay matches "
                      f"the eager step to {gap:.1e})")
        return loss

    def record(self):
        """Capture the step on the static tensors (executes nothing) on the run's device and side stream."""
        cuda = self.cuda
        if self.pool is None and self.pool_for_eager:
            with cuda.device(self.device):
                self.pool = cuda.MemPool()
        graph = cuda.CUDAGraph()
        cuda.synchronize(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cuda.device(self.device), cuda.stream(self.side):
                self.begin(graph)
                try:
                    self.static_loss = self.step(self.static_views, self.static_labels)
                except BaseException:
                    with contextlib.suppress(Exception):
                        graph.capture_end()  # leave capture mode; the step's error is the one to report
                    raise
                graph.capture_end()
        empty = [str(w.message) for w in caught if "empty" in str(w.message).lower()]
        if empty:
            raise RuntimeError(f"the captured graph is empty ({empty[0].splitlines()[0]})")
        for w in caught:  # anything else the capture warned about still reaches the user
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return graph

    def begin(self, graph) -> None:
        """``capture_begin`` into our MemPool; a torch that refuses one gets the graph's own pool."""
        if self.pool is not None:
            try:
                graph.capture_begin(pool=self.pool.id, capture_error_mode="thread_local")
                return
            except Exception as exc:  # noqa: BLE001 - only the memory sharing is lost
                self.pool, self.pool_for_eager = None, False
                self.log.info(f"cuda graphs: cannot capture into a MemPool ({type(exc).__name__}: {first_line(exc)}); "
                              f"the graph keeps its own memory and eager work allocates beside it")
        graph.capture_begin(capture_error_mode="thread_local")

    def restore(self, before: StepSnapshot, tensors: Sequence[torch.Tensor]) -> None:
        """Put back what a step (or a half-made capture) changed, device tensors and Python state."""
        self.cuda.synchronize(self.device)
        before.restore_into(tensors)
        self.set_rng_state(before.rng)
        self.step.opt.reset_step_state()

    def replay(self, views, labels) -> torch.Tensor:
        for static, view in zip(self.static_views, views):
            static.copy_(view, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.static_loss

    def disable(self, why: str) -> None:
        self.enabled, self.graph, self.off_reason = False, None, why
        self.log.info(f"cuda graphs off: {why}; the step runs eagerly (set train.cuda_graphs=false to silence)")


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
