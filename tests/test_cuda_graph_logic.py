"""GraphedStep's bookkeeping, on a CPU, with a stand-in for the torch.cuda API.

A real capture records kernels without running them and a replay reruns them on
the graph's static input tensors. The stand-in does the same with Python: the
capture runs the step and then restores every piece of state the step changes
(so it "executed nothing"), and a replay reruns the step on the static tensors
and writes the loss into the captured output tensor. With it, the order of
work is checked here: warm-up steps, one capture, replays that train each batch
exactly once, partial batches eager, and the fallback when capture fails or the
step synchronises. What only a GPU can show (kernels captured, no host sync)
is in test_step_sync.py, which runs where CUDA exists.
"""
import copy
import warnings
from contextlib import contextmanager, nullcontext

import torch

from conftest import QUICKSTART, ListLog, pcl_train_step, random_batch, records
from okd import checkpoint, trainer
from okd.cli import main
from okd.cuda_graph import GraphedStep


def build():
    step, _ = pcl_train_step()
    return step, step.method


class FakeGraph:
    def __init__(self):
        self.replay = None  # set by the fake capture


class FakeCuda:
    """The parts of torch.cuda that GraphedStep uses, acting on CPU tensors."""

    def __init__(self, train_step, fail_capture=False, sync_warning=False):
        self.train_step, self.fail_capture, self.sync_warning = train_step, fail_capture, sync_warning
        self.captures = self.replays = 0
        self.graphed = None  # the GraphedStep, to reach its static tensors

    class _Stream:
        def wait_stream(self, other):
            pass

    def Stream(self, device):  # noqa: N802 - torch's name
        return self._Stream()

    def current_stream(self, device=None):
        return self._Stream()

    def stream(self, s):
        return nullcontext()

    def synchronize(self, device=None):
        pass

    def get_sync_debug_mode(self):
        return 0

    def set_sync_debug_mode(self, mode):
        if mode == "warn" and self.sync_warning:
            warnings.warn("called a synchronizing CUDA operation")

    def CUDAGraph(self):  # noqa: N802
        return FakeGraph()

    def state(self):
        s, m = self.train_step, self.train_step.method
        return [copy.deepcopy(m.state_dict()), copy.deepcopy(s.opt.optimizer.state_dict()),
                s.meter.sums.clone(), s.meter.images.clone(), s.counter.clone(), s.health.count.clone(),
                s.health.first_step.clone(), torch.get_rng_state()]

    def restore(self, saved):
        s, m = self.train_step, self.train_step.method
        m.load_state_dict(saved[0])
        s.opt.optimizer.load_state_dict(saved[1])
        s.opt.prepare_state()
        for tensor, value in zip([s.meter.sums, s.meter.images, s.counter, s.health.count, s.health.first_step],
                                 saved[2:7]):
            tensor.copy_(value)
        torch.set_rng_state(saved[7])

    @contextmanager
    def graph(self, graph):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        saved = self.state()
        yield
        self.restore(saved)  # a capture executes nothing
        g = self.graphed

        def replay():
            # a real replay runs no Python: the epoch is whatever the device-side weight holds
            self.replays += 1
            epoch = self.train_step.method.kd_scale_epoch
            g.static_loss.copy_(g.step(g.static_views, g.static_labels, epoch))

        graph.replay = replay


def batches(n_full, partial=3, size=4):
    out = [random_batch(3, batch=size, seed=10 + i) for i in range(n_full)]
    if partial:
        views, labels = random_batch(3, batch=partial, seed=99)
        out.append((views, labels))
    return out


def run_graphed(fake_kwargs=None, n_full=7):
    step, method = build()
    fake = FakeCuda(step, **(fake_kwargs or {}))
    log = ListLog()
    graphed = GraphedStep(step, torch.device("cpu"), log, warmup=3, cuda=fake)
    fake.graphed = graphed
    losses = [float(graphed(v, y, 0, full=y.numel() == 4)) for v, y in batches(n_full)]
    return step, method, graphed, fake, log, losses


def run_eager(n_full=7):
    step, method = build()
    losses = [float(step(v, y, 0)) for v, y in batches(n_full)]
    return step, method, losses


def test_every_batch_is_trained_once_in_order_through_warmup_capture_and_replays():
    step, method, graphed, fake, log, losses = run_graphed()
    eager_step, eager_method, eager_losses = run_eager()
    assert fake.captures == 1 and graphed.graph is not None
    assert fake.replays == 4  # the captured batch and the 3 full batches after it
    assert losses == eager_losses  # 3 warm-up, 1 capture + replay, 3 replays, 1 partial batch eagerly
    for (name, a), b in zip(method.state_dict().items(), eager_method.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(step.meter.sums, eager_step.meter.sums) and int(step.counter) == 8
    assert any("the training step is one graph" in line for line in log.lines)


def test_a_failed_capture_falls_back_to_the_eager_step_with_a_reason():
    step, method, graphed, fake, log, losses = run_graphed({"fail_capture": True})
    _, eager_method, eager_losses = run_eager()
    assert losses == eager_losses and graphed.graph is None and not graphed.enabled
    assert [line for line in log.lines if line.startswith("cuda graphs off: capture failed (RuntimeError: "
                                                           "operation not permitted when stream is capturing)")]
    for a, b in zip(method.state_dict().values(), eager_method.state_dict().values()):
        assert torch.equal(a, b)


def test_a_step_that_synchronises_is_never_captured():
    _, _, graphed, fake, log, losses = run_graphed({"sync_warning": True})
    assert fake.captures == 0 and not graphed.enabled
    assert any("cuda graphs off: the step synchronises with the host" in line for line in log.lines)
    assert losses == run_eager()[2]


def test_the_trainer_with_a_graphed_step_trains_what_the_eager_trainer_trains(tmp_path, monkeypatch):
    """Two epochs of 4 full batches and a partial one: warm-up, capture, replays across an epoch
    boundary (new lr and ramp-up weight read from the device), the partial batches eagerly."""
    run = ["--config", QUICKSTART, "device=cpu", "data.train_subset=300", "train.batch_size=64", "train.epochs=2",
           "schedule.milestones=[1]", "method.rampup_epochs=2", f"output.root={tmp_path}"]
    assert main([*run, "--save_dir", "eager"]) == 0
    fakes = []

    def graphed_step(step, device, log):
        fake = FakeCuda(step)
        fake.graphed = GraphedStep(step, device, log, cuda=fake)
        fakes.append(fake)
        return fake.graphed

    monkeypatch.setattr(trainer, "use_cuda_graphs", lambda *args: True)
    monkeypatch.setattr(trainer, "GraphedStep", graphed_step)
    assert main([*run, "--save_dir", "graphed"]) == 0
    assert fakes[0].captures == 1 and fakes[0].replays == 1 + 4  # epoch 1: batch 4; epoch 2: batches 1-4
    eager = checkpoint.load(tmp_path / "eager" / "last.pt")["method_state"]
    graphed = checkpoint.load(tmp_path / "graphed" / "last.pt")["method_state"]
    assert all(torch.equal(eager[k], graphed[k]) for k in eager)
    for a, b in zip(records(tmp_path / "eager"), records(tmp_path / "graphed")):
        assert a["val"] == b["val"] and a["train"]["loss"] == b["train"]["loss"] and a["lr"] == b["lr"]
