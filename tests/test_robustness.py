"""Multi-process training, kills, stop signals, damaged checkpoints and non-finite losses."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, records

from okd import checkpoint_file
from okd.cli import main

QUICK = ["--config", str(REPO / "configs/quickstart.yml"), "data.train_subset=384", "data.test_subset=97",
         "train.batch_size=64", "schedule.milestones=[1]", "method.rampup_epochs=2", "device=cpu", "train.threads=1"]



def final_weights(run_dir):
    return checkpoint_file.load(Path(run_dir) / "last.pt")["method_state"]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- torchrun

def test_two_process_gloo_run_matches_single_process(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OKD_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests/helpers/ddp_worker.py"), *QUICK, "train.epochs=1", f"output.root={tmp_path}",
           "--save_dir", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # identical weights and temporal means (and BN statistics) on both ranks
    assert_bitwise_equal(torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt"))
    assert any(k.startswith("mean.") for k in torch.load(dump / "rank0.pt"))
    ddp = records(tmp_path / "ddp")[-1]
    assert ddp["val"]["count"] == 97  # every test image once, though 97 does not split evenly
    assert ddp["distributed"] == {"world_size": 2, "ranks_in_sync": True}
    # only rank 0 wrote: one run directory, one line per epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "dump"]
    assert len(records(tmp_path / "ddp")) == 1

    assert main([*QUICK, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "single"]) == 0
    single = records(tmp_path / "single")[-1]
    # same global batch, same images and augmentations; only the BN batch statistics differ (per rank)
    assert ddp["train"]["loss"]["total"] == pytest.approx(single["train"]["loss"]["total"], rel=0.01)
    diffs = [abs(ddp["val"]["top1"][m] - single["val"]["top1"][m]) for m in single["val"]["top1"]]
    assert sum(diffs) / len(diffs) <= 5.0, diffs


def test_world_size_must_divide_the_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main([*QUICK, "train.epochs=1", f"output.root={tmp_path}"]) == 2
    assert "not divisible by the torchrun world size 3" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- kills and signals

KILL_ARGS = [*QUICK, "data.train_subset=512", "train.batch_size=32", "train.epochs=3", "schedule.milestones=[2]",
             "checkpoint.every_n_steps=1", "train.log_every=1"]


def start(tmp_path, name):
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *KILL_ARGS, f"output.root={tmp_path}",
                             "--save_dir", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_steps(proc, count):
    """Read the run's output until ``count`` more progress lines have appeared; False if it ended."""
    seen = 0
    for line in proc.stdout:
        if " step " in line:
            seen += 1
            if seen >= count:
                return True
    return False


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference run, shared by the kill and signal tests."""
    root = tmp_path_factory.mktemp("straight")
    proc = start(root, "straight")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    return root / "straight"


@pytest.mark.ci  # slow and needed: .ci/run runs it (pyproject's markers)
def test_sigkill_at_random_moments_then_rerun_is_bitwise_equal(tmp_path, straight_run):
    rng = random.Random(1234)
    kills = 0
    for _ in range(5):
        proc = start(tmp_path, "killed")
        if wait_for_steps(proc, rng.randint(1, 12)):
            time.sleep(rng.uniform(0.0, 0.05))  # anywhere inside a step or a checkpoint write
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=300)
    assert kills >= 4
    proc = start(tmp_path, "killed")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert_bitwise_equal(final_weights(straight_run), final_weights(tmp_path / "killed"))
    assert [r["epoch"] for r in records(tmp_path / "killed")] == [1, 2, 3]
    assert [r["val"] for r in records(tmp_path / "killed")] == [r["val"] for r in records(straight_run)]


@pytest.mark.ci  # slow and needed: .ci/run runs it (pyproject's markers)
def test_sigterm_writes_last_and_the_rerun_continues(tmp_path, straight_run):
    proc = start(tmp_path, "stopped")
    assert wait_for_steps(proc, 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in out and "rerun the same command to continue" in out
    state = checkpoint_file.load(tmp_path / "stopped" / "last.pt")
    assert state["epoch"] < 3 and state["global_step"] >= 5
    proc = start(tmp_path, "stopped")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from" in out
    assert_bitwise_equal(final_weights(straight_run), final_weights(tmp_path / "stopped"))


# ---------------------------------------------------------------- damaged checkpoints

def test_damaged_last_falls_back_to_previous(tmp_path, capsys):
    assert main([*QUICK, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "run"]) == 0
    assert main([*QUICK, "train.epochs=2", f"output.root={tmp_path}", "--save_dir", "run"]) == 0
    last, prev = tmp_path / "run" / "last.pt", tmp_path / "run" / "last.prev.pt"
    assert checkpoint_file.load(prev)["epoch"] == 1 and checkpoint_file.load(last)["epoch"] == 2
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with pytest.raises(checkpoint_file.CheckpointError, match="truncated"):
        checkpoint_file.load(last)
    capsys.readouterr()
    # rerunning continues from the previous good checkpoint, with a warning naming the bad file
    assert main([*QUICK, "train.epochs=2", f"output.root={tmp_path}", "--save_dir", "run"]) == 0
    captured = capsys.readouterr()
    assert "is truncated" in captured.err and "last.prev.pt" in captured.err
    assert "resumed from" in captured.out and checkpoint_file.load(last)["epoch"] == 2


def test_flipped_byte_is_a_checksum_error(tmp_path):
    path = tmp_path / "x.pt"
    checkpoint_file.save_atomic({"weights": torch.arange(1000.0)}, path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint_file.CheckpointError, match="checksum mismatch"):
        checkpoint_file.load(path)


# ---------------------------------------------------------------- non-finite losses

def test_nonfinite_loss_stops_naming_step_epoch_and_term(tmp_path, capsys, monkeypatch):
    from okd.methods.pcl import PCL

    original = PCL.forward_train
    calls = {"n": 0}

    def poisoned(self, views, labels):
        terms = original(self, views, labels)
        calls["n"] += 1
        if calls["n"] == 9:  # step 9 = epoch 2, batch 3
            terms = {**terms, "kd_mean": terms["kd_mean"] * float("nan")}
        return terms

    monkeypatch.setattr(PCL, "forward", poisoned)  # what calling the module runs: forward_train
    run = [*QUICK, "train.epochs=2", f"output.root={tmp_path}", "--save_dir", "run"]
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 9 (epoch 2, batch 3) in term(s) total, kd_mean" in err
    state = checkpoint_file.load(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in state["method_state"].values() if v.is_floating_point())

    calls["n"] = 0
    assert main([*run[:-3], "train.nonfinite=skip", f"output.root={tmp_path}", "--save_dir", "skip"]) == 0
    rec = records(tmp_path / "skip")
    assert rec[-1]["skipped_steps"] == 1 and rec[-1]["step"] == 12


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_checkpoints_its_scaler(tmp_path, precision):
    run = [*QUICK, "data.train_subset=128", "train.epochs=1", f"train.precision={precision}",
           f"output.root={tmp_path}", "--save_dir", precision]
    assert main(run) == 0
    state = checkpoint_file.load(tmp_path / precision / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["method_state"].values() if v.is_floating_point())
    # fp16 needs loss scaling; its scale travels with the checkpoint (bf16 does without)
    assert ("scale" in state["scaler"]) == (precision == "fp16")
