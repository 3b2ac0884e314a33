"""A stand-in for the parts of ``torch.cuda`` that ``GraphedStep`` uses, acting on CPU tensors.

A real capture records kernels without running them and a replay reruns them on
the graph's static input tensors. The stand-in does the same with Python: the
capture runs the step and then puts back every piece of state the step changed
(so it "executed nothing"), and a replay reruns the step on the static tensors and
writes the loss into the captured output tensor. It also records what a capture
was asked for (device, stream, ``capture_error_mode``, memory pool) and which eager
work ran inside the graph's pool, and can play the faults that a GPU shows: a
capture on the wrong device (the step runs eagerly, the graph is empty), a failure
at ``capture_begin`` / inside the step / at ``capture_end``, a failure inside the
fp16 scaler's ``step`` (after ``unscale_``), a step that synchronises, and an empty
graph that does not warn. ``okd.preflight`` runs the graph checks through it on a
CPU and the tests use it to check ``GraphedStep``'s order of work.

It rejects what torch.cuda rejects: every device argument goes through torch's own
``torch.cuda._utils._get_device_index`` (an unindexed ``cuda`` is the current device where torch
allows that, an error where torch raises, a CPU device an error), ``set_sync_debug_mode`` takes
torch's modes only, and ``capture_begin`` torch's capture modes and pool ids only; only the question
"which device is current" is answered from the stand-in's state instead of a GPU's. Tensors stay on
the CPU: ``standin_graphed_step`` gives ``GraphedStep`` a CUDA device to name (``cuda:0`` for a CPU run).

Its state copy is its own (``state_dict`` deep copies), independent of
``TrainStep.state_tensors``, which ``GraphedStep`` relies on.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch.cuda._utils import _get_device_index as torch_device_index

FAULTS = (None, "begin", "step", "end", "scaler", "empty_silent")
CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")  # what CUDAGraph.capture_begin accepts
SYNC_DEBUG_MODES = {"default": 0, "warn": 1, "error": 2}  # torch.cuda.set_sync_debug_mode's names


def device_index(device, current: int, optional: bool) -> int:
    """``torch.cuda._utils._get_device_index(device, optional)`` with the stand-in's current device.

    torch answers an unindexed ``cuda`` (or None) with the current device when ``optional`` and raises
    otherwise; every other argument goes through torch's own check, so a CPU device or a bare ``cuda``
    where torch wants an index raises exactly where torch raises."""
    if optional:
        d = torch.device(device) if isinstance(device, str) else device
        if d is None or (isinstance(d, torch.device) and d.type == "cuda" and d.index is None):
            return current
    return torch_device_index(device, optional=False)


class _Stream:
    def __init__(self, index: int):
        self.device_index = index

    def wait_stream(self, other) -> None:
        if not isinstance(other, _Stream):
            raise TypeError(f"wait_stream expects a torch.cuda.Stream, got {type(other).__name__}")


class StandInMemPool:
    _ids = 0

    def __init__(self, allocator=None, use_on_oom: bool = False, no_split: bool = False):
        if allocator is not None:
            raise TypeError("the stand-in's MemPool has no custom allocators")
        StandInMemPool._ids += 1
        self.id = (0, StandInMemPool._ids)


def pool_id(pool):
    """What ``capture_begin`` accepts as ``pool``: None, a MemPool, or a pool id (a pair of ints)."""
    if pool is None:
        return None
    if isinstance(pool, StandInMemPool):
        return pool.id
    if isinstance(pool, tuple) and len(pool) == 2 and all(isinstance(i, int) for i in pool):
        return pool
    raise TypeError(f"capture_begin(pool=...) takes a MemPool or a pool id (a pair of ints), got {pool!r}")


class StandInGraph:
    def __init__(self, cuda: "StandInCuda"):
        self.cuda = cuda
        self._replay = None

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        c = self.cuda
        pool = pool_id(pool)
        if capture_error_mode not in CAPTURE_ERROR_MODES:
            raise RuntimeError(f"Unknown capture error mode. Expected `global`, `thread_local`, or `relaxed`, "
                               f"got {capture_error_mode}")
        if pool is not None and c.refuse_mem_pool:
            raise RuntimeError("CUDA graphs cannot use a user-created MemPool here")
        c.captures.append({"device": c.current_device, "stream": c.current_stream_obj,
                           "capture_error_mode": capture_error_mode, "pool": pool})
        if c.fault == "begin":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        c.capturing = True
        on_device = c.current_device == c.run_device_index
        c.recorded = on_device and c.fault != "empty_silent"
        c.saved = c.state() if on_device else None  # a capture on another device runs the step for real
        if c.fault == "step":
            c.arm_step_failure()
        if c.fault == "scaler":
            c.arm_scaler_failure()

    def capture_end(self) -> None:
        c = self.cuda
        c.capturing = False
        c.disarm()
        if c.saved is not None:
            c.restore(c.saved)  # a capture executes nothing
            c.saved = None
        if c.fault == "end":
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        if not c.recorded:
            if c.fault != "empty_silent":
                warnings.warn("The CUDA Graph is empty. This usually means that the graph was attempted to be "
                              "captured on wrong device or stream.")
            self._replay = lambda: None
            return
        graphed = c.graphed

        def replay():
            # a real replay runs no Python: it reads whatever the device tensors (lr, kd_scale) hold now
            c.replays += 1
            graphed.static_loss.copy_(graphed.step(graphed.static_views, graphed.static_labels))

        self._replay = replay

    def replay(self) -> None:
        self._replay()


class StandInCuda:
    """``torch.cuda`` for ``GraphedStep`` on a CPU; ``graphed`` must be set to the GraphedStep it serves."""

    def __init__(self, train_step, fault: Optional[str] = None, sync_warning: bool = False, run_device_index: int = 0,
                 mem_pool: bool = True, refuse_mem_pool: bool = False):
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        self.train_step, self.fault, self.sync_warning = train_step, fault, sync_warning
        self.run_device_index = run_device_index
        self.refuse_mem_pool = refuse_mem_pool  # an older torch whose graphs take no user MemPool
        self.current_device = 0
        self.current_stream_obj = _Stream(0)
        self.sync_debug_mode = 0
        self.captures: List[Dict] = []
        self.replays = 0
        self.capturing = False
        self.recorded = False
        self.saved = None
        self.pool_entries = 0  # eager steps and evaluations run inside use_mem_pool
        self.pool_streams: List = []  # the current stream at each entry
        self.in_pool = False
        self.graphed = None
        self._undo = []
        if mem_pool:
            self.MemPool = StandInMemPool

    # ---------------------------------------------------------------- torch.cuda's API
    def index(self, device, optional: bool) -> int:
        return device_index(device, self.current_device, optional)

    def Stream(self, device=None, priority: int = 0):  # noqa: N802 - torch's name
        return _Stream(self.index(device, optional=True))  # torch: ``with torch.cuda.device(device)``

    def current_stream(self, device=None):
        self.index(device, optional=True)
        return self.current_stream_obj

    @contextmanager
    def stream(self, s):
        if s is not None and not isinstance(s, _Stream):  # torch's StreamContext reads ``s.device``
            raise AttributeError(f"'{type(s).__name__}' object has no attribute 'device'")
        previous = self.current_stream_obj
        if s is not None:
            self.current_stream_obj = s
        try:
            yield
        finally:
            self.current_stream_obj = previous

    @contextmanager
    def device(self, d):
        previous, self.current_device = self.current_device, self.index(d, optional=True)
        try:
            yield
        finally:
            self.current_device = previous

    def synchronize(self, device=None) -> None:
        self.index(device, optional=True)  # torch: ``with torch.cuda.device(device)``

    def get_sync_debug_mode(self) -> int:
        return self.sync_debug_mode

    def set_sync_debug_mode(self, mode) -> None:
        if isinstance(mode, str):
            if mode not in SYNC_DEBUG_MODES:
                raise RuntimeError("invalid value of debug_mode, expected one of `default`, `warn`, `error`")
            mode = SYNC_DEBUG_MODES[mode]
        if mode not in SYNC_DEBUG_MODES.values():
            raise RuntimeError(f"invalid value of debug_mode {mode}, expected 0, 1 or 2")
        self.sync_debug_mode = mode
        if mode == 1 and self.sync_warning:
            warnings.warn("called a synchronizing CUDA operation")

    @staticmethod
    def rng_device(device) -> torch.device:
        """torch.cuda.get_rng_state's reading of its device argument (a str, an int or a torch.device)."""
        if isinstance(device, str):
            return torch.device(device)
        if isinstance(device, int):
            return torch.device("cuda", device)
        if not isinstance(device, torch.device):
            raise AttributeError(f"'{type(device).__name__}' object has no attribute 'index'")
        return device

    def get_rng_state(self, device="cuda"):
        self.rng_device(device)
        return None  # the CPU generator is the one the step draws from here; GraphedStep saves it itself

    def set_rng_state(self, state, device="cuda") -> None:
        self.rng_device(device)
        if state is not None and not torch.is_tensor(state):
            raise TypeError(f"set_rng_state expects a ByteTensor, got {type(state).__name__}")

    def CUDAGraph(self):  # noqa: N802
        return StandInGraph(self)

    @contextmanager
    def use_mem_pool(self, pool, device=None):
        # torch: ``current_device() if device is None else _get_device_index(device)``: a bare "cuda" raises
        if device is not None:
            self.index(device, optional=False)
        if not isinstance(pool, StandInMemPool):  # torch reads ``pool.id``
            raise AttributeError(f"'{type(pool).__name__}' object has no attribute 'id'")
        self.pool_entries += 1
        self.pool_streams.append(self.current_stream_obj)
        self.in_pool = True
        try:
            yield
        finally:
            self.in_pool = False

    # ---------------------------------------------------------------- the stand-in's own state copy
    def state(self):
        s, m = self.train_step, self.train_step.method
        return [copy.deepcopy(m.state_dict()), copy.deepcopy(s.opt.optimizer.state_dict()),
                copy.deepcopy(s.opt.scaler.state_dict()) if s.opt.scaler.is_enabled() else None,
                s.meter.sums.clone(), s.meter.images.clone(), s.counter.clone(), s.health.count.clone(),
                s.health.first_step.clone(), torch.get_rng_state()]

    def restore(self, saved) -> None:
        s, m = self.train_step, self.train_step.method
        with torch.no_grad():
            for k, v in m.state_dict().items():
                v.copy_(saved[0][k])
            params = [p for group in s.opt.optimizer.param_groups for p in group["params"]]
            for index, state in saved[1]["state"].items():
                for name, value in state.items():
                    if torch.is_tensor(value):
                        s.opt.optimizer.state[params[index]][name].copy_(value)
            if saved[2] is not None:
                s.opt.scaler._scale.fill_(saved[2]["scale"])
                s.opt.scaler._growth_tracker.fill_(saved[2]["_growth_tracker"])
            for tensor, value in zip([s.meter.sums, s.meter.images, s.counter, s.health.count, s.health.first_step],
                                     saved[3:8]):
                tensor.copy_(value)
        torch.set_rng_state(saved[8])

    # ---------------------------------------------------------------- faults inside the step
    def arm_step_failure(self) -> None:
        method = self.train_step.method

        def failing(*args, **kwargs):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        method.forward = failing  # what calling the module runs (forward_train); removed by disarm

    def arm_scaler_failure(self) -> None:
        scaler = self.train_step.opt.scaler

        def failing(optimizer, *args, **kwargs):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        scaler.step = failing
        self._undo.append(lambda: scaler.__dict__.pop("step", None))

    def disarm(self) -> None:
        method = self.train_step.method
        method.__dict__.pop("forward", None)
        for undo in self._undo:
            undo()
        self._undo.clear()


def standin_graphed_step(train_step, device, log, **kwargs):
    """(GraphedStep over ``train_step`` with a stand-in ``torch.cuda``, the stand-in). ``device``: the run's
    (a CPU run's graph names ``cuda:0``, the device the stand-in plays; the tensors stay where they are)."""
    from .cuda_graph import GraphedStep

    graph_kwargs = {k: kwargs.pop(k) for k in ("warmup", "tolerance") if k in kwargs}
    device = torch.device(device)
    if device.type != "cuda":
        device = torch.device("cuda", 0)
    kwargs.setdefault("run_device_index", device.index if device.index is not None else 0)
    cuda = StandInCuda(train_step, **kwargs)
    graphed = GraphedStep(train_step, device, log, cuda=cuda, **graph_kwargs)
    cuda.graphed = graphed
    return graphed, cuda
