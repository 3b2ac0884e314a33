"""``python -m okd.table`` without a cluster: cells, time limits, the Slurm settings file, a failing
cell's record and status, and the one-line errors (tests/test_slurm.py runs it against a real Slurm)."""
import json
import math
from argparse import Namespace

import pytest
from conftest import QUICKSTART, REPO

from okd import table
from okd.errors import OkdError

TINY = ["device=cpu", "data.train_subset=128", "train.batch_size=64", "train.epochs=2", "schedule.milestones=[]"]


def test_cells_are_the_run_directories_run_table_names(tmp_path):
    cells = table.build_cells(QUICKSTART, ["vanilla", "dml"], ["resnet8_tiny", "resnet32+resnet8_tiny"], [0, 1],
                              [f"output.root={tmp_path}", *TINY])
    assert len(cells) == 8
    cell = cells[0]
    assert cell.name == "quickstart_resnet8_tiny_vanilla_seed0" and cell.run_dir == str(tmp_path / cell.name)
    assert cell.argv[:8] == ["--config", QUICKSTART, "--model", "resnet8_tiny", "--method", "vanilla", "--seed", "0"]
    assert cell.epochs == 2 and cells[-1].name == "quickstart_resnet32+resnet8_tiny_dml_seed1"


def test_a_time_limit_is_the_planners_estimate_times_the_margin(tmp_path):
    """Seed 1's limit from seed 0's measured speed: epochs x images / (img/s) x margin + 5 minutes."""
    from okd.cli import main

    assert main(["--config", QUICKSTART, "--method", "vanilla", "--save_dir", "quickstart_resnet8_tiny_vanilla_seed0",
                 f"output.root={tmp_path}", *TINY]) == 0
    records = [json.loads(line) for line in (tmp_path / "quickstart_resnet8_tiny_vanilla_seed0" / "metrics.jsonl")
               .read_text().splitlines()]
    speeds = sorted(r["train"]["img_per_s"] for r in records)
    speed = (speeds[0] + speeds[1]) / 2  # the median of two epochs
    cells = table.build_cells(QUICKSTART, ["vanilla"], ["resnet8_tiny"], [1], [f"output.root={tmp_path}", *TINY])
    table.time_limits(cells, QUICKSTART, [f"output.root={tmp_path}", *TINY], 3.0, None, False, 0, seeds=[0, 1])
    assert cells[0].minutes == math.ceil(2 * 128 / speed * 3.0 / 60) + 5
    unknown = table.build_cells(QUICKSTART, ["dml"], ["resnet8_tiny"], [0], [f"output.root={tmp_path}", *TINY])
    with pytest.raises(table.TableError, match="no measured speed for quickstart_resnet8_tiny_dml_seed0; pass"):
        table.time_limits(unknown, QUICKSTART, [f"output.root={tmp_path}", *TINY], 1.5, None, False, 0)
    table.time_limits(unknown, QUICKSTART, [f"output.root={tmp_path}", *TINY], 1.5, 42, False, 0)
    assert unknown[0].minutes == 42


def test_the_slurm_settings_file_fills_what_no_flag_gave_and_refuses_unknown_keys(tmp_path):
    f = tmp_path / "slurm.yml"
    f.write_text("slurm:\n  partition: gpu\n  gpus_per_task: 1\n  cpus_per_task: 8\n  mem: 32G\n  time_margin: 2\n")
    args = Namespace(slurm=str(f), **{k: None for k in table.SLURM_KEYS})
    args.cpus_per_task = 4  # a flag wins
    table.apply_slurm_file(args)
    assert (args.partition, args.gpus_per_task, args.cpus_per_task, args.mem, args.time_margin) == \
        ("gpu", 1, 4, "32G", 2)
    assert (args.signal_delay, args.max_requeues, args.account) == (90, 10, None)
    f.write_text("partitoin: gpu\n")
    with pytest.raises(table.TableError, match="unknown key 'partitoin' in --slurm"):
        table.apply_slurm_file(Namespace(slurm=str(f), **{k: None for k in table.SLURM_KEYS}))
    f.write_text("gpus_per_task: one\n")
    with pytest.raises(table.TableError, match="'gpus_per_task' in --slurm .* must be int"):
        table.apply_slurm_file(Namespace(slurm=str(f), **{k: None for k in table.SLURM_KEYS}))


def test_a_cell_with_a_user_error_fails_with_its_one_line_error_and_status_says_so(tmp_path):
    cells = table.build_cells(QUICKSTART, ["ahbf"], ["switokd_wrn16_2"], [0], [f"output.root={tmp_path}", *TINY])
    tdir = tmp_path / "table-quickstart"
    with pytest.raises(table.CellFailed, match="method ahbf needs branches of increasing depth"):
        table.CellTask(table.asdict(cells[0]), str(tdir))()
    state = json.loads(table.cell_state_path(tdir, cells[0].name).read_text())
    assert state["state"] == "failed" and state["exit_code"] == 2 and state["attempt"] == 1
    assert table.cell_status(cells[0], tdir, {}).startswith("failed: okd: error: method ahbf needs branches")
    assert table.cell_status(cells[0], tdir, {}).count("\n") == 0


def test_status_reads_the_queue_the_run_directory_and_the_cells_record(tmp_path):
    cells = table.build_cells(QUICKSTART, ["vanilla"], ["resnet8_tiny"], [0], [f"output.root={tmp_path}", *TINY])
    cell, tdir = cells[0], tmp_path / "table-quickstart"
    cell.task = "41_3"
    assert table.cell_status(cell, tdir, {"41_3": "PENDING"}) == "queued: 0/2 epochs done"
    table.write_json(table.cell_state_path(tdir, cell.name), {"state": "interrupted", "attempt": 1, "restarts": 0})
    assert table.cell_status(cell, tdir, {"41_3": "PENDING"}) == "queued: 0/2 epochs done, requeued after epoch 0"
    assert table.cell_status(cell, tdir, {}) == \
        "stopped: 0/2 epochs done, not in the queue; submit again to continue"
    table.write_json(table.cell_state_path(tdir, cell.name), {"state": "running", "attempt": 2, "restarts": 1})
    assert table.cell_status(cell, tdir, {"41_3": "RUNNING"}) == "running: epoch 1/2, requeued 1x"


def test_table_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(table, "shutil_which", lambda name: None)
    assert table.main(["submit", "--engine", "slurm", "--config", QUICKSTART, "--methods", "vanilla",
                       "--backbones", "resnet8_tiny", "--time", "5", f"output.root={tmp_path}", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("okd-table: error: --engine slurm needs Slurm's sbatch") and "\n" not in err
    assert table.main(["status", "--table", str(tmp_path / "nothing")]) == 2
    assert "no table submitted under" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        table.main(["submit", "--engine", "local", "--config", QUICKSTART, "--bogus"])
    assert exit_.value.code == 2
    assert issubclass(table.TableError, OkdError) and (REPO / "src" / "okd" / "table.py").is_file()


def test_the_slurm_parameters_are_ones_submitits_own_sbatch_builder_accepts(tmp_path):
    """No cluster needed: submitit's _make_sbatch_string takes its parameters as keywords and raises on an
    unknown one, as the real submission would (SlurmExecutor itself needs srun on PATH)."""
    slurm = pytest.importorskip("submitit.slurm.slurm")
    from types import SimpleNamespace

    args = SimpleNamespace(**{**table.SLURM_DEFAULTS, "partition": "gpu", "account": None, "qos": "high",
                              "mem": "32G", "gpus_per_task": 1, "array_parallelism": 4})
    params = table.slurm_parameters(args, 42, "cifar100")
    executor_only = {"array_parallelism"}  # SlurmExecutor's own, not an sbatch line
    text = slurm._make_sbatch_string(command="true", folder=str(tmp_path),
                                     **{k: v for k, v in params.items() if k not in executor_only})
    for line in ("#SBATCH --time=42", "#SBATCH --job-name=okd-cifar100", "#SBATCH --partition=gpu",
                 "#SBATCH --qos=high", "#SBATCH --mem=32G", "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --signal=USR2@90", "#SBATCH --requeue"):
        assert line in text, line
    accepted = {k: v for k, v in params.items() if k not in executor_only}
    with pytest.raises(TypeError, match="gpus_per_tsk"):  # what a misspelt parameter meets
        slurm._make_sbatch_string(command="true", folder=str(tmp_path), **{**accepted, "gpus_per_tsk": 1})
