"""No CPU default kills the process: oneDNN's channels_last weight gradient of a strided 1x1 convolution
with fewer input channels than its channel block writes past its workspace (uxlfoundation/oneDNN#6035)
and aborts on odd batches (2-core Intel Xeon with AVX-512 and AMX, 2-core AMD EPYC Zen 4; torch 2.14.1); on a
2-core AMD EPYC family 23 (AVX2) it hangs at 2 threads and segfaults at 1, on any batch, below 5 input channels.
okd finds such convolutions in the run's model (``okd.devices.channels_last_hazards``), trains those
models in NCHW on a CPU and refuses a forced ``train.channels_last=true`` in one line."""
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import QUICKSTART, run_cli
from torch import nn

from okd.config import load_config
from okd.devices import ONEDNN_CHANNEL_BLOCK, channels_last_hazards, cpu_channels_last_hazards, resolve_auto
from okd.errors import ConfigError

CPU = torch.device("cpu")


def test_the_hazard_is_a_strided_1x1_convolution_over_fewer_channels_than_the_block():
    net = nn.Sequential(
        nn.Conv2d(8, 16, 1, stride=2),  # the quickstart's shortcut: hazard
        nn.Conv2d(16, 32, 1, stride=2),  # as many channels as the AVX-512 block: safe
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 3x3: another kernel
        nn.Conv2d(8, 16, 1, stride=1),  # stride 1: no reduction to unit stride, no workspace
        nn.Conv2d(48, 48, 1, stride=2, groups=4),  # 12 input channels per group: hazard
        nn.Conv2d(3, 64, (1, 1), stride=(1, 2)),  # a stride in one direction is enough
    )
    assert ONEDNN_CHANNEL_BLOCK == 16
    assert channels_last_hazards(net) == ["0 (1x1, stride 2, 8 input channels)", "4 (1x1, stride 2, 12 input channels)",
                                          "5 (1x1, stride 1, 3 input channels)"]


def test_of_the_registered_backbones_only_resnet8_tiny_has_one_and_cuda_keeps_channels_last(monkeypatch):
    from okd.models import BACKBONES

    flagged = {name: cpu_channels_last_hazards(load_config(None, [f"model.name={name}", "method.name=vanilla"]))
               for name in BACKBONES.names()}
    assert {name for name, h in flagged.items() if h} == {"resnet8_tiny"}
    assert flagged["resnet8_tiny"] == ["net.trunk.4.0.downsample.0 (1x1, stride 2, 8 input channels)"]
    # PCL's peers share one trunk, which has it, and so has the trunk's temporal mean; the meta build draws
    # no random numbers
    state = torch.get_rng_state()
    assert cpu_channels_last_hazards(load_config(QUICKSTART, [])) == [
        "net.peers.trunk.4.0.downsample.0 (1x1, stride 2, 8 input channels)",
        "mean.module.peers.trunk.4.0.downsample.0 (1x1, stride 2, 8 input channels)"]
    assert torch.equal(state, torch.get_rng_state())
    cfg = load_config(QUICKSTART, ["train.precision=fp32"])
    run, _ = resolve_auto(cfg, torch.device("cuda", 0))  # cuDNN has no such kernel
    assert run.train.channels_last is True


def test_a_cpu_run_of_an_affected_model_defaults_to_nchw_and_a_forced_channels_last_is_refused():
    run, chosen = resolve_auto(load_config(QUICKSTART, ["train.precision=fp32"]), CPU)
    assert run.train.channels_last is False
    assert "channels_last False" in chosen[0] and "channels_last off: net.peers.trunk.4.0.downsample.0 " \
                                                  "(1x1, stride 2, 8 input channels) hits uxlfoundation/oneDNN#6035" in chosen[0]
    with pytest.raises(ConfigError) as err:
        resolve_auto(load_config(QUICKSTART, ["train.precision=fp32", "train.channels_last=true"]), CPU)
    assert "\n" not in str(err.value) and "resnet8_tiny's net.peers.trunk.4.0.downsample.0" in str(err.value)
    assert "uxlfoundation/oneDNN#6035" in str(err.value) and "train.channels_last=null" in str(err.value)
    run, _ = resolve_auto(load_config(QUICKSTART, ["train.precision=fp32", "model.name=resnet32"]), CPU)
    assert run.train.channels_last is True  # no hazard: channels_last stays the CPU default


def test_the_issue_command_with_an_odd_last_batch_trains_with_the_defaults(tmp_path):
    """79 images: four batches of 16 and one of 15 (exit 134 or 139 on the CPUs above before the fix)."""
    proc = run_cli("--config", QUICKSTART, "data.train_subset=79", "train.batch_size=16", "train.epochs=1",
                   "schedule.milestones=[]", "data.test_subset=32", f"output.root={tmp_path}")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "channels_last False" in proc.stdout and "final |" in proc.stdout


def test_a_forced_channels_last_on_an_affected_model_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--config", QUICKSTART, "train.channels_last=true", "data.train_subset=79", "train.batch_size=16",
                   f"output.root={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("okd: error: train.channels_last=true on a CPU: resnet8_tiny's ")
    assert not (tmp_path / "quickstart").exists()


# Runs in a fresh interpreter: each case in a forked child (a crash kills only the child), before the parent
# has computed anything (OpenMP's threads do not survive a fork). A child that hangs (the same defect spins
# forever on a 2-core AMD EPYC family 23 with AVX2) is stopped by its alarm after 10 s (a case takes
# milliseconds) and counts as failed: it would hang the training process just as surely.
PROBE = textwrap.dedent("""
    import itertools, json, os, signal, sys
    import torch

    def case(batch, cin, kernel, stride):
        torch.set_num_threads(2)
        conv = torch.nn.Conv2d(cin, 16, kernel, stride=stride, padding=kernel // 2).to(memory_format=torch.channels_last)
        x = torch.randn(batch, cin, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
        for _ in range(3):
            conv(x).sum().backward()

    crashed = []
    for args in itertools.product((3, 15), (3, 8, 12, 16, 32), (1, 3), (1, 2)):
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            case(*args)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            crashed.append(args)
    print(json.dumps(crashed))
""")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_every_convolution_that_crashes_this_cpu_in_channels_last_is_one_okd_refuses():
    """On a CPU with the defect some cases crash or hang; each must be one the rule flags. (Elsewhere none do.)"""
    import json

    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    crashed = [tuple(c) for c in json.loads(proc.stdout.strip().splitlines()[-1])]
    flagged = {(cin, k, s) for cin in (3, 8, 12, 16, 32) for k in (1, 3) for s in (1, 2)
               if channels_last_hazards(nn.Conv2d(cin, 16, k, stride=s))}
    missed = [c for c in crashed if c[1:] not in flagged]
    assert not missed, f"crashed or hung in channels_last but not refused by okd: {missed} (batch, cin, kernel, stride)"
    print(f"crashed or hung on this CPU: {crashed}")
