"""GraphedStep's bookkeeping, on a CPU, with ``okd.cuda_standin`` playing torch.cuda.

The stand-in's capture runs the step and puts back what it changed (a capture executes
nothing) and its replay reruns the step on the static tensors. With it, the order of
work is checked here: warm-up steps, one capture, one check replay against the eager
step, replays that train each batch exactly once, partial batches eager inside the
graph's memory pool, and every fallback (a capture that fails at its start, inside the
step, at its end, inside the fp16 scaler, on the wrong device, or that records nothing)
leaving the run exactly as the eager step would. What only a GPU can show (kernels
captured, no host sync) is in test_step_sync.py and ``python -m okd.preflight``, which
run where CUDA exists.
"""
import math

import pytest
import torch
from conftest import QUICKSTART, ListLog, pcl_train_step, random_batch, records

from okd import checkpoint_file, trainer
from okd.cli import main
from okd.cuda_graph import relative_gap
from okd.cuda_standin import standin_graphed_step

CUDA1 = torch.device("cuda", 1)  # the stand-in's tensors stay on the CPU; the device names the capture's


def batches(n_full, partial=3, size=4):
    out = [random_batch(3, batch=size, seed=10 + i) for i in range(n_full)]
    if partial:
        out.append(random_batch(3, batch=partial, seed=99))
    return out


def run_graphed(n_full=7, device=CUDA1, precision="fp32", **standin):
    step, _ = pcl_train_step(precision=precision)
    log = ListLog()
    graphed, cuda = standin_graphed_step(step, device, log, warmup=3, **standin)
    losses = [float(graphed(v, y)) for v, y in batches(n_full)]
    return step, graphed, cuda, log, losses


def run_eager(n_full=7, precision="fp32"):
    step, _ = pcl_train_step(precision=precision)
    losses = [float(step(v, y)) for v, y in batches(n_full)]
    return step, losses


def assert_same_run(step, eager_step):
    """Weights, temporal mean, BN statistics, momentum, scaler, loss sums and counter bit for bit."""
    for (name, a), b in zip(step.method.state_dict().items(), eager_step.method.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(step.opt.state_tensors(), eager_step.opt.state_tensors()):
        assert torch.equal(a, b)
    assert torch.equal(step.meter.sums, eager_step.meter.sums)
    assert torch.equal(step.meter.images, eager_step.meter.images)
    assert int(step.counter) == int(eager_step.counter)


def test_every_batch_is_trained_once_in_order_through_warmup_capture_check_and_replays():
    step, graphed, cuda, log, losses = run_graphed()
    eager_step, eager_losses = run_eager()
    assert len(cuda.captures) == 1 and graphed.captured
    # the check replay (its result put back), then the 3 full batches after the captured one
    assert cuda.replays == 4 and graphed.replays == 3
    assert losses == eager_losses  # 3 warm-up, the captured batch eagerly, 3 replays, 1 partial batch eagerly
    assert_same_run(step, eager_step)
    assert int(step.counter) == 8 and graphed.replay_gap == 0.0
    assert any("the training step is one graph (batch 4; its replay matches the eager step" in line
               for line in log.lines)


def test_the_capture_is_made_on_the_runs_device_and_stream_in_thread_local_mode_into_a_pool():
    """cuda:1 must not be captured from GPU 0's current stream (an empty graph), and the pin-memory
    thread's allocations must not invalidate the capture ("global" mode forbids them)."""
    _, graphed, cuda, _, _ = run_graphed(n_full=4)
    (capture,) = cuda.captures
    assert capture["device"] == 1 and capture["stream"] is graphed.side
    assert capture["capture_error_mode"] == "thread_local"
    assert capture["pool"] == graphed.pool.id
    assert cuda.current_device == 0 and cuda.current_stream_obj is not graphed.side  # both left afterwards


def test_the_partial_batch_runs_inside_the_graphs_memory_pool_once_there_is_a_graph():
    step, _ = pcl_train_step()
    graphed, cuda = standin_graphed_step(step, CUDA1, ListLog(), warmup=1)
    views, labels = random_batch(3, batch=3)
    graphed(views, labels)  # before any graph: nothing to share
    assert cuda.pool_entries == 0
    for v, y in batches(3, partial=0):
        graphed(v, y)  # warm-up, capture
    graphed(views, labels)
    with graphed.memory():  # what the trainer wraps evaluation in
        pass
    assert graphed.captured and cuda.pool_entries == 2
    assert all(stream is graphed.side for stream in cuda.pool_streams)  # the pool's blocks are the side stream's
    assert cuda.current_stream_obj is not graphed.side


def test_without_mempool_in_torch_eager_work_allocates_beside_the_graph():
    step, graphed, cuda, _, _ = run_graphed(mem_pool=False)
    assert graphed.captured and graphed.pool is None and cuda.pool_entries == 0
    assert cuda.captures[0]["pool"] is None


def test_a_torch_whose_graphs_take_no_mempool_still_captures_with_the_graphs_own_pool():
    step, graphed, cuda, log, losses = run_graphed(refuse_mem_pool=True)
    assert graphed.captured and graphed.pool is None and cuda.captures[-1]["pool"] is None
    assert cuda.pool_entries == 0 and losses == run_eager()[1]
    assert any(line.startswith("cuda graphs: cannot capture into a MemPool (RuntimeError: ") for line in log.lines)


@pytest.mark.parametrize("fault, reason", [
    ("begin", "capture failed (RuntimeError: CUDA error: operation not permitted when stream is capturing)"),
    ("step", "capture failed (RuntimeError: CUDA error: operation not permitted when stream is capturing)"),
    ("end", "capture failed (RuntimeError: CUDA error: operation failed due to a previous error during capture)"),
    ("empty_silent", "a replay of the captured step disagrees with the eager step (relative gap inf > 0.05"),
])
def test_a_failed_capture_falls_back_to_exactly_the_eager_run_with_one_reason(fault, reason):
    step, graphed, cuda, log, losses = run_graphed(fault=fault)
    eager_step, eager_losses = run_eager()
    assert losses == eager_losses and not graphed.captured and not graphed.enabled
    assert_same_run(step, eager_step)
    off = [line for line in log.lines if line.startswith("cuda graphs off:")]
    assert len(off) == 1 and off[0].startswith(f"cuda graphs off: {reason}"), off
    assert cuda.current_device == 0 and cuda.current_stream_obj is not graphed.side  # not left on the side stream


def test_a_capture_on_another_device_than_the_runs_is_empty_and_undone():
    """torch warns only that the graph is empty, and the step ran eagerly during the capture: both
    must be caught and the batch trained once."""
    step, graphed, cuda, log, losses = run_graphed(run_device_index=2)  # the tensors live on "cuda:2"
    eager_step, eager_losses = run_eager()
    assert losses == eager_losses and not graphed.captured
    assert_same_run(step, eager_step)
    assert any("capture failed (RuntimeError: the captured graph is empty (The CUDA Graph is empty" in line
               for line in log.lines)


def test_fp16_a_capture_failing_after_unscale_leaves_the_scaler_as_the_eager_step_would():
    step, graphed, cuda, log, losses = run_graphed(precision="fp16", fault="scaler")
    eager_step, eager_losses = run_eager(precision="fp16")
    assert losses == eager_losses and not graphed.captured
    assert_same_run(step, eager_step)
    assert float(step.opt.scaler.get_scale()) == float(eager_step.opt.scaler.get_scale())


def test_fp16_graphed_run_trains_what_the_eager_run_trains():
    step, graphed, _, _, losses = run_graphed(precision="fp16")
    eager_step, eager_losses = run_eager(precision="fp16")
    assert graphed.captured and losses == eager_losses
    assert_same_run(step, eager_step)


def test_a_step_that_synchronises_is_never_captured():
    step, graphed, cuda, log, losses = run_graphed(sync_warning=True)
    assert cuda.captures == [] and not graphed.enabled
    assert any("cuda graphs off: the step synchronises with the host" in line for line in log.lines)
    assert losses == run_eager()[1]


def test_relative_gap_by_hand():
    before = [torch.zeros(3), torch.zeros(1), torch.tensor([5])]
    eager = [torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.01]), torch.tensor([6])]
    groups = ["big", "small", "count"]
    assert relative_gap(eager, before, eager, groups) == 0.0
    assert relative_gap(before[:2] + eager[2:], before, eager, groups) == pytest.approx(1.0)  # nothing replayed
    # the big group exact, the small one off by half its change: 0.5, not drowned by the big one
    assert relative_gap([eager[0], torch.tensor([0.005]), eager[2]], before, eager, groups) == pytest.approx(0.5)
    assert relative_gap([eager[0], eager[1], torch.tensor([7])], before, eager, groups) == math.inf
    assert math.isnan(relative_gap([torch.full((3,), math.nan), eager[1], eager[2]], before, eager, groups))
    # a group the eager step left alone must stay alone
    assert relative_gap([eager[0], torch.tensor([0.02])], [before[0], eager[1]], eager[:2], groups[:2]) == math.inf


def test_the_trainer_with_a_graphed_step_trains_what_the_eager_trainer_trains(tmp_path, monkeypatch):
    """Two epochs of 4 full batches and a partial one: warm-up, capture, replays across an epoch
    boundary (new lr and ramp-up weight read from the device), the partial batches and evaluations
    eagerly inside the graph's pool."""
    run = ["--config", QUICKSTART, "device=cpu", "data.train_subset=300", "train.batch_size=64", "train.epochs=2",
           "schedule.milestones=[1]", "method.rampup_epochs=2", f"output.root={tmp_path}"]
    assert main([*run, "--save_dir", "eager"]) == 0
    stand_ins = []

    def graphed_step(step, device, log):
        graphed, cuda = standin_graphed_step(step, device, log)
        stand_ins.append(cuda)
        return graphed

    monkeypatch.setattr(trainer, "use_cuda_graphs", lambda *args: True)
    monkeypatch.setattr(trainer, "GraphedStep", graphed_step)
    assert main([*run, "--save_dir", "graphed"]) == 0
    cuda = stand_ins[0]
    assert len(cuda.captures) == 1 and cuda.replays == 1 + 4  # epoch 1: the check; epoch 2: batches 1-4
    assert cuda.pool_entries == 4  # two partial batches, two evaluations
    eager = checkpoint_file.load(tmp_path / "eager" / "last.pt")["method_state"]
    graphed = checkpoint_file.load(tmp_path / "graphed" / "last.pt")["method_state"]
    assert all(torch.equal(eager[k], graphed[k]) for k in eager)
    for a, b in zip(records(tmp_path / "eager"), records(tmp_path / "graphed")):
        assert a["val"] == b["val"] and a["train"]["loss"] == b["train"]["loss"] and a["lr"] == b["lr"]


DEVICES = [torch.device("cuda"), torch.device("cuda", 1), "cuda", "cuda:0", 1, torch.device("cpu"), "cpu", None]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_the_stand_in_checks_devices_with_torchs_own_check(device):
    """Where torch's _get_device_index raises (no GPU needed to ask it), the stand-in raises; an unindexed
    device is the current one exactly where torch allows it (optional=True)."""
    from torch.cuda._utils import _get_device_index

    step, _ = pcl_train_step()
    _, cuda = standin_graphed_step(step, CUDA1, ListLog())
    try:
        expected = _get_device_index(device, optional=False)
    except ValueError:
        expected = None
    pool = cuda.MemPool()
    if expected is None:
        with pytest.raises(ValueError):
            with cuda.use_mem_pool(pool, device if device is not None else "cuda"):
                pass
    else:
        with cuda.use_mem_pool(pool, device):
            pass
    unindexed = device is None or torch.device(device).type == "cuda" and torch.device(device).index is None \
        if not isinstance(device, int) else False
    for optional_call in (cuda.Stream, cuda.current_stream, cuda.synchronize, lambda d: cuda.device(d).__enter__()):
        if expected is None and not unindexed:  # a CPU device: torch raises even where an index is optional
            with pytest.raises(ValueError):
                optional_call(device)
        else:
            optional_call(device)


def test_the_stand_in_refuses_what_torch_cuda_refuses():
    step, _ = pcl_train_step()
    _, cuda = standin_graphed_step(step, CUDA1, ListLog())
    with pytest.raises(ValueError, match="specified index"):  # the bug the GPU check died of, through use_mem_pool
        with cuda.use_mem_pool(cuda.MemPool(), torch.device("cuda")):
            pass
    with pytest.raises(AttributeError):
        with cuda.use_mem_pool(object(), 0):
            pass
    with pytest.raises(RuntimeError, match="invalid value of debug_mode"):
        cuda.set_sync_debug_mode("loud")
    cuda.set_sync_debug_mode("error")
    assert cuda.get_sync_debug_mode() == 2
    graph = cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Unknown capture error mode"):
        graph.capture_begin(capture_error_mode="strict")
    with pytest.raises(TypeError):
        graph.capture_begin(pool="the pool")
    with pytest.raises(AttributeError):
        with cuda.stream("side"):
            pass
    with pytest.raises(AttributeError):
        cuda.get_rng_state(3.0)


def test_a_graph_named_by_an_unindexed_device_loses_the_pool_as_torch_would_and_says_so():
    """What main did on a GPU with device=auto: use_mem_pool raised, the partial batch allocated beside."""
    step, _ = pcl_train_step()
    log = ListLog()
    graphed, cuda = standin_graphed_step(step, torch.device("cuda"), log, warmup=1)
    for v, y in batches(3):
        graphed(v, y)
    assert graphed.captured and cuda.pool_entries == 0 and graphed.pool_error.startswith("ValueError: Expected")
    assert any("eager work cannot share the graph's memory pool (ValueError" in line for line in log.lines)
