"""A run directory has one owner, and a full disk is a one-line error that loses nothing."""
import errno
import json
import os
import re
import signal
import subprocess
import sys

from conftest import QUICKSTART, REPO, records, run_cli, tree_digest

from okd import checkpoint_file
from okd.cli import main
from okd.runlock import LOCK_NAME, RunLock, check_free

TINY = ["--config", QUICKSTART, "data.train_subset=128", "data.test_subset=64", "train.batch_size=64",
        "schedule.milestones=[1]", "method.rampup_epochs=2", "device=cpu", "train.threads=1"]


def holder(run_dir):
    """A second process that holds the run directory's lock until told to stop."""
    code = ("import sys, time; sys.path.insert(0, %r); from okd.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)" % str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_first_and_touches_nothing(tmp_path):
    assert main([*TINY, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "run"]) == 0
    other = holder(tmp_path / "run")
    try:
        before = tree_digest(tmp_path)
        for extra in ([], ["train.epochs=2"], ["--overwrite"]):
            proc = run_cli(*TINY, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "run", *extra)
            assert proc.returncode == 2, proc.stderr
            err = proc.stderr.strip()
            assert "\n" not in err and "Traceback" not in err
            assert f"is in use by pid {other.pid} on host" in err and "started 20" in err
            assert tree_digest(tmp_path) == before
    finally:
        other.kill()
        other.wait()


def test_the_lock_is_released_on_exit_and_a_stale_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    other = holder(run_dir)
    other.send_signal(signal.SIGKILL)  # its lock dies with it, its record stays in the file
    other.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == other.pid
    check_free(run_dir)  # a stale lock is no obstacle
    assert main([*TINY, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "run"]) == 0
    log = (run_dir / "log.txt").read_text()
    assert f"took over the stale lock of pid {other.pid}" in log
    # released after a clean exit: the file stays, emptied, and can be locked again
    # (release after an error exit: the full-disk test below reruns in the same process)
    assert (run_dir / LOCK_NAME).read_text() == ""
    lock = RunLock(run_dir).acquire()
    lock.release()
    assert main([*TINY, "train.epochs=2", f"output.root={tmp_path}", "--save_dir", "run"]) == 0
    assert [r["epoch"] for r in records(run_dir)] == [1, 2]


def test_torchrun_ranks_all_stop_when_the_run_directory_is_busy(tmp_path):
    """Rank 0 owns the lock under torchrun; every rank refuses a busy directory instead of hanging."""
    other = holder(tmp_path / "run")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
             str(REPO / "main.py"), *TINY, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "run"],
            capture_output=True, text=True, timeout=240, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0
        # the first rank to refuse exits with 2 and torchrun then stops the other with SIGTERM, which
        # may come before that rank has printed its own refusal: one message at least, and no rank
        # ended any other way (nothing hung, nothing crashed)
        assert proc.stderr.count(f"is in use by pid {other.pid}") >= 1, proc.stderr[-2000:]
        codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
        assert 2 in codes and set(codes) <= {2, -15}, proc.stderr[-2000:]
    finally:
        other.kill()
        other.wait()


# ---------------------------------------------------------------- full disk

def disk_full_after(monkeypatch, writes_ok):
    """Let ``writes_ok`` checkpoint writes through, then fail the next ones half-way with ENOSPC."""
    real = checkpoint_file._write
    calls = {"n": 0}

    def write(fh, header, payload):
        calls["n"] += 1
        if calls["n"] <= writes_ok:
            return real(fh, header, payload)
        fh.write(header)
        fh.write(bytes(payload[: len(payload) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_file, "_write", write)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run = [*TINY, f"output.root={tmp_path}", "--save_dir", "run"]
    assert main([*run, "train.epochs=1"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "run"
    disk_full_after(monkeypatch, writes_ok=0)
    assert main([*run, "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"no space left on the device writing '{run_dir}/" in err and "MB are free" in err
    assert "it needs" in err and "the previous checkpoint is kept" in err
    assert checkpoint_file.load(run_dir / "last.pt")["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name or ".prev" in p.name and p.name != "last.prev.pt"]
    monkeypatch.undo()
    assert main([*run, "train.epochs=2"]) == 0
    assert checkpoint_file.load(run_dir / "last.pt")["epoch"] == 2


def test_temporary_files_of_an_earlier_crash_are_removed(tmp_path):
    run = [*TINY, f"output.root={tmp_path}", "--save_dir", "run"]
    assert main([*run, "train.epochs=1"]) == 0
    run_dir = tmp_path / "run"
    for name in (".last.pt.tmp4242", ".best.pt.tmp17", ".last.pt.prev99"):
        (run_dir / name).write_bytes(b"half a checkpoint")
    assert main([*run, "train.epochs=2"]) == 0
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []


def test_a_full_disk_elsewhere_is_one_line_too(tmp_path, capsys, monkeypatch):
    """Any ENOSPC (here: the metrics file) ends the run with one line naming the file."""
    from okd import logger

    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))

    monkeypatch.setattr(logger.RunLogger, "epoch_record", full)
    assert main([*TINY, "train.epochs=1", f"output.root={tmp_path}", "--save_dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("okd: error: no space left on the device writing") and "metrics.jsonl" in err
    assert "\n" not in err


def test_a_run_directory_written_while_this_run_started_is_not_overwritten(tmp_path, capsys, monkeypatch):
    """The race of two launches: the other one wrote last.pt after this one read the directory."""
    from okd import cli

    run = [*TINY, f"output.root={tmp_path}", "--save_dir", "run"]
    assert main([*run, "train.epochs=1"]) == 0
    run_dir = tmp_path / "run"
    original = cli.load_checked_dataset

    def meanwhile(cfg):  # another process finishes an epoch while this one loads its data
        (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes() + b"")
        os.utime(run_dir / "last.pt", ns=(1, 1))
        return original(cfg)

    monkeypatch.setattr(cli, "load_checked_dataset", meanwhile)
    before = (run_dir / "last.pt").read_bytes(), (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*run, "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was written by another process while this one was starting" in err and "\n" not in err
    assert ((run_dir / "last.pt").read_bytes(), (run_dir / "metrics.jsonl").read_text()) == before
    monkeypatch.undo()
    assert main([*run, "train.epochs=2"]) == 0  # and the lock was released
