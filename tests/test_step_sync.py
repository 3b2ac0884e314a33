"""The step decides on the device: a non-finite step changes nothing, and the host reads only at sync points."""
import copy

import pytest
import torch
from conftest import QUICKSTART, ListLog, pcl_train_step, random_batch, records

from okd import checkpoint_file
from okd.cli import main
from okd.config import config_from_dict
from okd.devices import resolve_device, use_cuda_device
from okd.distributed import DistInfo
from okd.errors import OkdError
from okd.loss_meter import LossMeter
from okd.methods.pcl import PCL
from okd.models import backbone_spec
from okd.optim import Optimization
from okd.run_state import RunState
from okd.step import TrainStep
from okd.sync import StepHealth

QUICK = ["--config", QUICKSTART, "device=cpu", "data.train_subset=256", "train.batch_size=64"]


def build(precision="fp32", nonfinite="skip"):
    step, sync = pcl_train_step(precision=precision, nonfinite=nonfinite)
    step.method.kd_scale.fill_(step.method.options.kd_scale(10))  # epoch 10 of the ramp-up
    step.sync = sync  # what the tests' sync points read
    return step, step.method, step.opt, sync.log


def snapshot(method, optimization, step):
    state = {f"p.{k}": v.detach().clone() for k, v in method.state_dict().items()}
    for i, (p, s) in enumerate(optimization.optimizer.state.items()):
        state[f"momentum.{i}"] = s["momentum_buffer"].clone()
    state["sums"], state["images"] = step.meter.sums.clone(), step.meter.images.clone()
    return state


def poison(method, where="kd_mean"):
    original = method.forward_train

    def forward_train(views, labels):
        terms = original(views, labels)
        return {**terms, where: terms[where] * float("nan")}

    method.forward = forward_train  # what calling the module runs
    return original


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_nonfinite_step_changes_no_weight_momentum_mean_or_sum(precision):
    step, method, optimization, log = build(precision)
    views, labels = random_batch(3, batch=4)
    step(views, labels)  # a good step first: momentum buffers and the temporal mean are non-trivial
    before = snapshot(method, optimization, step)
    original = poison(method)
    step(views, labels)
    after = snapshot(method, optimization, step)
    # BatchNorm running statistics do move (the forward ran); everything the step applies does not
    moved = [k for k in before if not torch.equal(before[k], after[k]) and "running_" not in k
             and "num_batches_tracked" not in k]
    assert moved == []
    # the host hears of it at the next sync point, with the step's index and its bad term
    state = RunState(step=2, batch_in_epoch=2)
    step.sync.check(state, 0, False, step.names)
    assert state.skipped_steps == 1
    assert log.lines and "non-finite loss at step 2 (epoch 1, batch 2) in term(s) total, kd_mean" in log.lines[-1]
    method.forward = original
    step(views, labels)  # and training goes on
    assert not torch.equal(snapshot(method, optimization, step)["sums"], after["sums"])


def test_the_first_step_can_be_skipped_without_corrupting_momentum():
    """The fused SGD leaves its own first-step buffers uninitialised when it skips; okd's are zeros."""
    step, method, optimization, _ = build()
    views, labels = random_batch(3, batch=4)
    reference = copy.deepcopy(method)
    original = poison(method)
    step(views, labels)
    method.forward = original
    step(views, labels)
    # the one applied step equals plain SGD's first step from the same weights
    opt = torch.optim.SGD(reference.parameter_groups(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    reference.train()
    # (the skipped step's forward moved BatchNorm running statistics, which a training-mode forward
    # does not read: the applied step sees the same batch statistics as this one)
    loss, _ = reference.training_loss(views, labels, 10)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for (name, a), b in zip(method.net.named_parameters(), reference.net.parameters()):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_stop_policy_raises_at_the_next_sync_point_naming_the_first_bad_step():
    step, method, optimization, _ = build(nonfinite="stop")
    views, labels = random_batch(3, batch=4)
    step(views, labels)
    poison(method, "ce_peers")
    step(views, labels)
    step(views, labels)
    with pytest.raises(OkdError, match=r"non-finite loss at step 2 \(epoch 1, batch 2\) in term\(s\) total, "
                                       r"ce_peers and 1 later step\(s\); the last good checkpoint is kept"):
        step.sync.check(RunState(step=3, batch_in_epoch=3), 0, False, step.names)


def test_deferred_reads_give_the_same_run_as_reads_every_step(tmp_path, monkeypatch):
    """train.sync_every changes when the host learns, never what is trained."""
    calls = {"n": 0}
    original = PCL.forward_train

    def poisoned(self, views, labels):
        terms = original(self, views, labels)
        calls["n"] += 1
        return {**terms, "kd_mean": terms["kd_mean"] * float("nan")} if calls["n"] == 3 else terms

    monkeypatch.setattr(PCL, "forward", poisoned)
    states = {}
    for every in (1, 3):
        calls["n"] = 0
        run = [*QUICK, "train.epochs=2", "schedule.milestones=[1]", "train.nonfinite=skip",
               f"train.sync_every={every}", f"output.root={tmp_path}", "--save_dir", f"every{every}"]
        assert main(run) == 0
        states[every] = checkpoint_file.load(tmp_path / f"every{every}" / "last.pt")["method_state"]
        assert records(tmp_path / f"every{every}")[-1]["skipped_steps"] == 1
    assert all(torch.equal(states[1][k], states[3][k]) for k in states[1])
    for a, b in zip(records(tmp_path / "every1"), records(tmp_path / "every3")):
        assert a["val"] == b["val"] and a["train"]["loss"] == b["train"]["loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_the_cuda_step_loop_never_synchronises(graphs):
    cfg = config_from_dict({"device": "cuda", "model": {"name": "resnet8_tiny"}, "method": {"name": "pcl"},
                            "train": {"precision": "bf16", "batch_size": 8, "cuda_graphs": graphs}})
    device = resolve_device("cuda")  # indexed, as every run's: use_mem_pool refuses a bare "cuda"
    use_cuda_device(device)
    torch.manual_seed(0)
    method = PCL(backbone_spec("resnet8_tiny", 10), 10, cfg.method).to(device).train()
    step = TrainStep(method, method, Optimization.build(cfg, method, device), LossMeter(device),
                     StepHealth(device, DistInfo()), cfg, device, batch_size=8)
    step.meter.load(RunState())
    step.start(RunState())
    views = [torch.randn(8, 3, 32, 32, device=device) for _ in range(3)]
    labels = torch.randint(0, 10, (8,), device=device)
    run = step
    if graphs:
        from okd.cuda_graph import GraphedStep

        graphed = GraphedStep(step, device, ListLog())
        run = graphed
    for _ in range(5):  # warm-up (and capture): lazy initialisations may read the device once
        run(views, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            run(views, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if graphs:
        assert graphed.graph is not None, "the step was not captured"
        # the partial batch runs eagerly inside the graph's pool where torch has MemPool
        run([v[:5] for v in views], labels[:5])
        torch.cuda.synchronize()
        assert graphed.pool_error is None
        if hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool"):
            assert graphed.pool is not None and graphed.pool_for_eager
    assert int(step.counter) == (16 if graphs else 15) and torch.isfinite(step.meter.sums).all()
