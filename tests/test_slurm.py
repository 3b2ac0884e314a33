"""The table on a real Slurm cluster (``.ci/run`` starts a single-node one with ``.ci/start_slurm.sh``).

Submits a small table of the digits quickstart through ``python -m okd.table``, requeues one task
mid-run, interrupts another with submitit's own signal (SIGUSR2, what a time limit or a preemption
sends), and checks that every cell finishes with the weights of an uninterrupted run, that ``status``
is right at each stage, that a cell with a user error ends failed with its one-line error, and that
``cancel`` stops a cell that keeps its checkpoint. Skipped, saying why, where no Slurm runs.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from okd import checkpoint_file
from okd.cli import main as okd_main


def slurm_state() -> str:
    """Why the tests cannot run here, or '' when a Slurm node is up."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "no Slurm here (sbatch/sinfo not on PATH); .ci/run starts one with .ci/start_slurm.sh"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not any(s.strip("*") in ("idle", "mixed", "allocated", "completing")
                                      for s in out.stdout.split()):
        return f"no Slurm node up (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return ""


# ci: minutes against the CI's own cluster, run by .ci/run after the default suite
pytestmark = [pytest.mark.ci, pytest.mark.skipif(bool(slurm_state()), reason=slurm_state() or "Slurm is up")]

# a run of ~60 steps: long enough to interrupt mid-run, short enough for CI (1 thread: bitwise comparable)
RUN = ["device=cpu", "data.train_subset=256", "train.batch_size=32", "schedule.milestones=[]",
       "train.threads=1", "train.epochs=8"]


def table(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "okd.table", *args], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def status(tdir) -> dict:
    out = table("status", "--table", str(tdir)).stdout
    return {line.split()[0]: line for line in out.splitlines() if line.strip()}


def wait_for(predicate, timeout=240, every=1.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def epochs(run_dir: Path) -> int:
    try:
        return max(json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if line.strip())
    except (OSError, ValueError):
        return 0


def in_queue(task: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", task.split("_")[0]], capture_output=True, text=True)
    return task in out.stdout.split()


def test_a_table_on_slurm_survives_a_requeue_and_a_preemption_signal_bit_for_bit(tmp_path):
    root = tmp_path / "runs"
    common = ["--config", "configs/quickstart.yml", f"output.root={root}", *RUN]
    out = table("submit", "--engine", "slurm", *common, "--methods", "vanilla dml", "--backbones", "resnet8_tiny",
                "--time", "10", "--cpus-per-task", "1").stdout
    tdir = root / "table-quickstart"
    cells = {c["name"]: c for c in json.loads((tdir / "table.json").read_text())["cells"]}
    vanilla, dml = "quickstart_resnet8_tiny_vanilla_seed0", "quickstart_resnet8_tiny_dml_seed0"
    assert set(cells) == {vanilla, dml}
    # the submission names the job, the cell -> task map, the run directories and the Slurm logs
    assert "submitted 2 cell(s) to Slurm as job(s)" in out
    for name, cell in cells.items():
        assert f"task {cell['task']}" in out and cell["run_dir"] in out and cell["log"] in out
        assert cell["minutes"] == 10
    first = status(tdir)
    assert all(("queued" in first[n] or "running" in first[n]) for n in cells), first

    # a requeue from outside (scontrol requeue: SIGTERM to the task) after 2 epochs of the vanilla cell
    wait_for(lambda: epochs(Path(cells[vanilla]["run_dir"])) >= 2, what="2 epochs of the vanilla cell")
    subprocess.run(["scontrol", "requeue", cells[vanilla]["task"]], check=True)
    # submitit's own signal (SIGUSR2: the time limit is near, or a preemption) to the dml cell mid-run
    wait_for(lambda: epochs(Path(cells[dml]["run_dir"])) >= 1, what="1 epoch of the dml cell")
    subprocess.run(["scancel", "--signal=USR2", cells[dml]["task"]], check=True)
    seen = wait_for(lambda: (lambda s: s if "requeued" in s[vanilla] else None)(status(tdir)), what="the requeue")
    assert "queued" in seen[vanilla] or "running" in seen[vanilla]

    # a cell with a user error: refused in one line, not requeued
    table("submit", "--engine", "slurm", *common, "--methods", "ahbf", "--backbones", "switokd_wrn16_2",
          "--time", "10", "--cpus-per-task", "1")
    bad = "quickstart_switokd_wrn16_2_ahbf_seed0"
    done = wait_for(lambda: (lambda s: s if all(k in s[n] for n, k in ((vanilla, "finished"), (dml, "finished"),
                                                                         (bad, "failed"))) else None)(status(tdir)),
                    timeout=420, every=3, what="every cell to end")
    assert "failed: okd: error: method ahbf needs branches of increasing depth" in done[bad]
    assert "reported best" in done[vanilla] and "reported best" in done[dml]
    bad_task = json.loads((tdir / "table.json").read_text())["cells"][-1]["task"]
    assert not in_queue(bad_task)  # not requeued forever
    for name in (vanilla, dml):  # both resumed, from a checkpoint written when they were stopped
        log = (Path(cells[name]["run_dir"]) / "log.txt").read_text()
        assert "resumed from" in log, name
    assert "batch" in (Path(cells[dml]["run_dir"]) / "log.txt").read_text().split("resumed from")[1].split("\n")[0]

    # the same cells straight through, here: the same weights, bit for bit
    for name in (vanilla, dml):
        method = name.split("_")[3]
        straight = tmp_path / "straight"
        assert okd_main(["--config", str(REPO / "configs/quickstart.yml"), "--model", "resnet8_tiny", "--method", method,
                         "--seed", "0", "--save_dir", name, f"output.root={straight}", *RUN]) == 0
        a = checkpoint_file.load(straight / name / "last.pt")
        b = checkpoint_file.load(Path(cells[name]["run_dir"]) / "last.pt")
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
        for key in a["method_state"]:
            assert torch.equal(a["method_state"][key], b["method_state"][key]), (name, key)

    # a second submit skips the finished cells and does not resubmit the failed one's neighbours
    again = table("submit", "--engine", "slurm", *common, "--methods", "vanilla dml", "--backbones",
                  "resnet8_tiny", "--time", "10").stdout
    assert "all 2 cell(s) are finished" in again


def test_cancel_stops_a_cell_which_keeps_its_checkpoint(tmp_path):
    root = tmp_path / "runs"
    common = ["--config", "configs/quickstart.yml", f"output.root={root}", *RUN[:-1], "train.epochs=40"]
    table("submit", "--engine", "slurm", *common, "--methods", "vanilla", "--backbones", "resnet8_tiny",
          "--time", "10", "--cpus-per-task", "1")
    tdir = root / "table-quickstart"
    cell = json.loads((tdir / "table.json").read_text())["cells"][0]
    wait_for(lambda: epochs(Path(cell["run_dir"])) >= 1, what="the first epoch")
    assert "cancelled 1 task(s)" in table("cancel", "--table", str(tdir)).stdout
    wait_for(lambda: not in_queue(cell["task"]), what="the task to leave the queue")
    line = wait_for(lambda: (lambda s: s if "stopped" in s else None)(status(tdir)[cell["name"]]),
                    what="status 'stopped'")
    assert "not in the queue; submit again to continue" in line
    assert (Path(cell["run_dir"]) / "last.pt").is_file()
