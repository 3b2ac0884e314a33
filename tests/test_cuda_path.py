"""The CUDA path's defects that a CPU can show: the current device, cuDNN's autotuner, momentum
buffers in another memory layout than their parameters, torch.compile's recompiles, and evaluation
in the run's precision and memory format."""
import functools
import math

import pytest
import torch
from conftest import QUICKSTART, ListLog, pcl_train_step, random_batch
from torch.cuda._utils import _get_device_index as torch_device_index

from okd import checkpoint_file, cli
from okd.build import prepare_runtime
from okd.cli import main
from okd.config import config_from_dict
from okd.cuda_standin import standin_graphed_step
from okd.devices import resolve_device, set_up_device, use_cuda_device
from okd.distributed import DistInfo
from okd.evaluate import Inference, score
from okd.optim import Optimization

QUICK = ["--config", QUICKSTART, "device=cpu", "data.train_subset=192", "train.batch_size=64"]


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda says two GPUs exist, GPU 0 current; ``set_device`` checks its argument with torch's own
    ``_get_device_index`` (a bare ``cuda`` raises, as on a GPU) and records the index; cuDNN's flag restored."""
    calls = []
    current = [0]

    def set_device(device):
        index = torch_device_index(device)  # what torch.cuda.set_device does first
        calls.append(torch.device("cuda", index))
        current[0] = index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    return calls


def test_the_fake_set_device_rejects_what_torch_rejects(two_fake_gpus):
    for bad in (torch.device("cuda"), "cuda", torch.device("cpu"), None):
        with pytest.raises(ValueError):
            torch.cuda.set_device(bad)
    assert two_fake_gpus == []


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_auto_and_cuda_resolve_to_the_current_gpu_with_its_index_and_make_it_current(two_fake_gpus, name):
    """torch.cuda.set_device (2.11 and 2.14) refuses an unindexed device: the GPU check died on its first line."""
    device = resolve_device(name)
    assert device == torch.device("cuda", 0) and device.index == 0
    use_cuda_device(device)
    assert two_fake_gpus == [torch.device("cuda", 0)] and torch.backends.cudnn.benchmark is True
    torch.cuda.set_device(1)  # another current GPU: a bare "cuda" means that one
    assert resolve_device(name) == torch.device("cuda", 1)


def test_every_tool_sets_its_device_up_as_a_training_run_does(two_fake_gpus):
    for name in ("auto", "cuda", "cuda:1"):
        device = set_up_device(name)
        assert device.index is not None and two_fake_gpus[-1] == device
    assert set_up_device("cpu") == torch.device("cpu") and len(two_fake_gpus) == 3


def test_a_run_on_cuda_1_makes_it_the_current_device_and_turns_on_cudnn_autotuning(two_fake_gpus):
    device = prepare_runtime(config_from_dict({"device": "cuda:1"}), DistInfo())
    assert device == torch.device("cuda", 1) and two_fake_gpus == [torch.device("cuda", 1)]
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_a_run_on_the_default_device_is_indexed_and_current(two_fake_gpus, name):
    device = prepare_runtime(config_from_dict({"device": name}), DistInfo())
    assert device == torch.device("cuda", 0) and two_fake_gpus == [torch.device("cuda", 0)]


def test_each_torchrun_process_makes_its_own_gpu_current(two_fake_gpus):
    device = prepare_runtime(config_from_dict({"device": "cuda"}), DistInfo(rank=1, world_size=2, local_rank=1))
    assert device == torch.device("cuda", 1) and two_fake_gpus == [torch.device("cuda", 1)]


def test_a_cpu_run_touches_no_cuda_state(two_fake_gpus):
    prepare_runtime(config_from_dict({"device": "cpu"}), DistInfo())
    assert two_fake_gpus == [] and torch.backends.cudnn.benchmark is False


def test_the_graph_of_a_run_on_the_default_gpu_shares_its_memory_pool_with_eager_work(two_fake_gpus):
    """The partial batch and the evaluation allocate from the graph's MemPool: with a bare "cuda",
    torch.cuda.use_mem_pool raised, okd caught it and silently stopped sharing."""
    step, _ = pcl_train_step()
    log = ListLog()
    graphed, cuda = standin_graphed_step(step, resolve_device("auto"), log, warmup=1)
    for i in range(3):
        graphed(*random_batch(3, batch=4, seed=i))  # warm-up, capture, a replay
    graphed(*random_batch(3, batch=3, seed=9))  # the partial batch
    with graphed.memory():  # what the trainer wraps evaluation in
        pass
    assert graphed.captured and graphed.pool_for_eager and cuda.pool_entries == 2
    assert not [line for line in log.lines if "memory pool" in line]


def conv_step(momentum_layout):
    """One fused-SGD step of a channels_last conv weight from a given momentum buffer layout."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    method = torch.nn.Module()
    method.conv = conv
    method.parameter_groups = lambda: [{"params": [conv.weight]}]
    cfg = config_from_dict({"device": "cpu", "optim": {"lr": 0.1, "nesterov": False, "weight_decay": 0.0}})
    optimization = Optimization.build(cfg, method, torch.device("cpu"))
    buffer = torch.randn(16, 8, 3, 3).contiguous(memory_format=momentum_layout)
    blob = optimization.state_dict()
    blob["optimizer"]["state"][0]["momentum_buffer"] = buffer.clone()
    optimization.load_state_dict(blob)  # as a resume does
    conv.weight.grad = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    expected = conv.weight.detach() - 0.1 * (0.9 * buffer + conv.weight.grad)  # SGD with momentum, by hand
    optimization.step(torch.zeros(()))
    return conv.weight.detach(), expected, optimization.optimizer.state[conv.weight]["momentum_buffer"]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_loaded_momentum_buffer_in_another_layout_updates_like_sgd(layout):
    weight, expected, buffer = conv_step(layout)
    assert buffer.stride() == weight.stride()
    torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-6)


def test_a_resume_that_toggles_channels_last_continues_as_a_run_that_never_toggled(tmp_path, channels_last_backbone):
    """One step per epoch: the resumed step is the first to read a loaded momentum buffer. A buffer
    left in the other layout moves weights by ~3e-3 here; channels_last's own rounding (a ReLU mask
    that flips at a kink) by ~4e-5 (AMD EPYC, torch 2.14.1). A deep net amplifies channels_last's rounding
    (its CPU BatchNorm is ~100x less exact than NCHW's) past the buffer's error: a tiny one."""
    run = ["--config", QUICKSTART, "device=cpu", "--model", channels_last_backbone, "data.train_subset=128",
           "train.batch_size=128",
           "train.epochs=2", "schedule.milestones=[]", f"output.root={tmp_path}"]
    assert main([*run, "train.channels_last=false", "--save_dir", "straight"]) == 0
    assert main([*run, "train.epochs=1", "train.channels_last=false", "--save_dir", "toggled"]) == 0
    assert main([*run, "train.channels_last=true", "--save_dir", "toggled"]) == 0
    straight = checkpoint_file.load(tmp_path / "straight" / "last.pt")["method_state"]
    toggled = checkpoint_file.load(tmp_path / "toggled" / "last.pt")["method_state"]
    for k in straight:
        torch.testing.assert_close(toggled[k].float(), straight[k].float(), rtol=0, atol=3e-4, msg=k)


def test_compiled_step_is_compiled_once_across_epochs(monkeypatch):
    """Dynamo would guard on the Python epoch and recompile at every epoch, then give up on compiling."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    step, _ = pcl_train_step(compile=True)
    views, labels = random_batch(3, batch=4)
    weights = []
    for epoch in (0, 1, 5, 30):
        step.method.kd_scale.fill_(step.method.options.kd_scale(epoch))  # what the trainer does per epoch
        step(views, labels)
        weights.append(float(step.method.kd_scale))
    torch._dynamo.reset()
    assert len(graphs) == 1  # a new ramp-up value is new data in the same buffer, not a recompile
    assert weights == pytest.approx([math.exp(-5 * (1 - e / 80) ** 2) for e in (0, 1, 5, 30)], rel=1e-6)
    assert weights[0] < weights[1] < weights[2]


class Recorder(torch.nn.Module):
    """A method whose logits are its inputs' first pixels, recording how they arrive."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def evaluate_logits(self, images):
        self.seen.append((images.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"),
                          torch.get_autocast_dtype("cpu")))
        logits = images[:, 0, 0, :]  # (B, W): class c scores pixel (0, 0, c)
        return {"m": logits @ torch.eye(logits.shape[1], dtype=logits.dtype)}


def test_evaluation_takes_the_runs_memory_format_and_precision():
    images = torch.zeros(4, 3, 2, 5)
    labels = torch.tensor([0, 1, 2, 3])
    images[torch.arange(4), 0, 0, torch.tensor([0, 1, 2, 4])] = 1.0  # the 4th image predicts class 4: wrong
    method = Recorder()
    inference = Inference(torch.device("cpu"), "bf16", channels_last=True)
    result = score(method, [(images[:2], labels[:2]), (images[2:], labels[2:])], 4, 5, DistInfo(),
                   lambda: images[:1], inference)
    assert result["top1"]["m"] == 75.0
    assert method.seen == [(True, True, torch.bfloat16)] * 2
    cfg = config_from_dict({"train": {"precision": "fp32", "channels_last": False}})
    plain = Recorder()
    score(plain, [(images, labels)], 4, 5, DistInfo(), lambda: images[:1], Inference.of(cfg, torch.device("cpu")))
    assert plain.seen[0][:2] == (False, False)


def test_the_cli_evaluates_a_channels_last_run_with_channels_last_inputs(tmp_path, monkeypatch, channels_last_backbone):
    seen = []
    real = Inference.__call__

    def spy(self, method, images):
        seen.append(images.contiguous(memory_format=self.memory_format).is_contiguous(
            memory_format=torch.channels_last) and self.memory_format == torch.channels_last)
        return real(self, method, images)

    monkeypatch.setattr(Inference, "__call__", spy)
    assert cli.main([*QUICK, "--model", channels_last_backbone, "train.epochs=1", "schedule.milestones=[]",
                     "train.channels_last=true", f"output.root={tmp_path}"]) == 0
    assert seen and all(seen)
