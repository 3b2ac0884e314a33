"""Reproduction records (okd.results), the published table (okd.paper), the table planner (okd.plan),
run_table.sh's queue, and per-device defaults (okd.devices)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import QUICKSTART, REPO

from okd import devices, hardware
from okd.cli import main
from okd.config import load_config
from okd.paper import PAPER_TOP1, paper_top1
from okd.plan import Cell, schedule_seconds
from okd.report import main as report_main
from okd.results import main as results_main

QUICK = ["--config", QUICKSTART, "device=cpu", "data.train_subset=128", "train.batch_size=64", "train.epochs=1",
         "schedule.milestones=[]"]


def test_the_published_table_as_printed_in_the_spec():
    assert len(PAPER_TOP1) == 2 * 5 * 7
    # spot checks copied by hand from docs/methods.md §10, one per row and column at least
    assert paper_top1("cifar10", "resnet32", "pcl") == 94.33
    assert paper_top1("cifar100", "wrn20_8", "ffl") == 78.22
    assert paper_top1("cifar100", "densenet40_12", "okddip") == 71.23
    assert paper_top1("cifar10", "vgg16", "dml") == 94.13
    assert paper_top1("cifar100", "resnet110", "cl") == 78.83
    assert paper_top1("cifar10", "wrn20_8", "kdcl") == 95.27
    assert paper_top1("cifar100", "resnet32", "one") == 73.79
    assert paper_top1("cifar10", "resnet32", "vanilla") is None
    # the later papers' own rows: MCL's x2 column, SwitOKD's student; every row names its source
    assert paper_top1("cifar100", "resnet32", "mcl") == 72.96
    assert paper_top1("cifar100", "shufflenetv2_x0_5", "mcl") == 69.55
    assert paper_top1("cifar100", "switokd_wrn16_2+mobilenetv2", "switokd") == 67.24
    from okd.paper import PUBLISHED

    assert len(PUBLISHED) == 70 + 7 * 3 + 4 * 2 + 2 and all(p.source and p.protocol for p in PUBLISHED)
    assert [p.checked for p in PUBLISHED if p.method in ("okdph", "ahbf")] == [False, False]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main([*QUICK, f"output.root={root}", "--save_dir", "done"]) == 0
    return root / "done"


def test_a_record_is_read_from_the_run_and_never_overwritten(finished_run, tmp_path, capsys):
    out = tmp_path / "results"
    for _ in range(2):
        assert results_main(["record", str(finished_run), "--protocol", "scaled", "--wall-seconds", "12.5",
                             "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["digits_resnet8_tiny_pcl_1ep_scaled_seed0.json", "digits_resnet8_tiny_pcl_1ep_scaled_seed0_2.json"]
    record = json.loads((out / files[0]).read_text())
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    summary = metrics[-1]["summary"]["reported"]
    assert record["reported_best"] == summary["best"] and record["reported_last"] == summary["last"]
    assert record["img_per_s"] == metrics[-1]["train"]["img_per_s"]  # the median of one epoch
    assert (record["method"], record["model"], record["epochs"], record["protocol"], record["seed"]) == \
        ("pcl", "resnet8_tiny", 1, "scaled", 0)
    assert record["wall_seconds"] == 12.5 and record["precision"] in ("fp32", "bf16")  # resolved, not "auto"
    assert record["device"] == hardware.cpu_name() and record["torch"] == torch.__version__
    assert record["config"]["train"]["epochs"] == 1 and record["commit"]
    assert record["recipe"] == "common protocol"


def test_an_unfinished_run_is_not_recorded(finished_run, tmp_path, capsys):
    from okd import checkpoint_file

    blob = checkpoint_file.load(finished_run / "last.pt")
    (tmp_path / "half").mkdir()
    checkpoint_file.save_atomic({**blob, "epoch": 0}, tmp_path / "half" / "last.pt")
    capsys.readouterr()
    assert results_main(["record", str(tmp_path / "half"), "--protocol", "paper", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"okd-results: error: run '{tmp_path / 'half'}' has finished 0 of 1 epochs; record finished "
                   f"runs only (or pass --unfinished)"]
    assert not list(tmp_path.glob("*.json"))
    # with --unfinished: nothing finished yet is still nothing to record
    assert results_main(["record", str(tmp_path / "half"), "--protocol", "scaled", "--unfinished"]) == 2
    assert "has not finished an epoch yet" in capsys.readouterr().err


def test_a_run_stopped_early_is_recorded_as_unfinished_when_asked(finished_run, tmp_path, capsys):
    """What the GPU check keeps when its time limit stops a run: the epochs it finished."""
    from okd import checkpoint_file

    blob = checkpoint_file.load(finished_run / "last.pt")
    (tmp_path / "stopped").mkdir()
    planned = {**blob["config"], "train": {**blob["config"]["train"], "epochs": 4}}
    checkpoint_file.save_atomic({**blob, "config": planned}, tmp_path / "stopped" / "last.pt")
    (tmp_path / "stopped" / "metrics.jsonl").write_text((finished_run / "metrics.jsonl").read_text())
    assert results_main(["record", str(tmp_path / "stopped"), "--protocol", "scaled", "--unfinished",
                         "--out", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").iterdir()
    record = json.loads(path.read_text())
    assert path.name == "digits_resnet8_tiny_pcl_1of4ep_scaled_seed0.json"
    assert record["finished"] is False and (record["epochs_done"], record["epochs"]) == (1, 4)
    assert "1 of 4 epochs (scaled)" in capsys.readouterr().out
    assert report_main([str(tmp_path / "out")]) == 0
    assert "| 1 of 4, stopped (scaled) |" in capsys.readouterr().out


def test_report_prints_records_beside_the_paper(tmp_path, capsys):
    record = {"okd_result": 1, "method": "pcl", "model": "resnet32", "dataset": "cifar10", "epochs": 300,
              "protocol": "paper", "seed": 0, "reported_best": 94.0, "reported_last": 93.9, "wall_seconds": 540.0,
              "img_per_s": 30000.0, "precision": "bf16", "device": "NVIDIA H100 80GB HBM3", "commit": "abc1234"}
    (tmp_path / "r.json").write_text(json.dumps(record))
    (tmp_path / "other.json").write_text(json.dumps({"not": "a record"}))
    assert report_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if "| pcl |" in line]
    assert len(row) == 1
    assert "| 94.00 | 93.90 | 94.33 | -0.33 | 30,000 | 9.0 min | NVIDIA H100 80GB HBM3 | bf16 |" in row[0]


def test_plan_schedules_longest_first_and_reads_speed_from_runs(finished_run):
    # longest-processing-time on 2 queues: 3+2+2 | 3+2 -> 7 (by hand)
    assert schedule_seconds([3, 3, 2, 2, 2], 2) == 7
    assert schedule_seconds([5], 4) == 5 and schedule_seconds([], 2) == 0
    cell = Cell("resnet8_tiny", "pcl", 0, epochs=10, done=4, img_per_s=100.0)
    assert cell.seconds_left(1000) == 6 * 1000 / 100.0
    proc = subprocess.run(
        [sys.executable, "-m", "okd.plan", "--config", QUICKSTART, "--name", "x", "--backbones", "resnet8_tiny",
         "--methods", "pcl", "--seeds", "0", "--gpus", "2", f"output.root={finished_run.parent}", "train.epochs=3",
         "schedule.milestones=[]"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    assert "without a measured speed (pass --measure)" in proc.stdout  # no run named x_resnet8_tiny_pcl_seed0
    (finished_run.parent / "x_resnet8_tiny_pcl_seed0").symlink_to(finished_run)
    proc = subprocess.run(proc.args, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    speed = json.loads((finished_run / "metrics.jsonl").read_text().splitlines()[-1])["train"]["img_per_s"]
    line = [x for x in proc.stdout.splitlines() if x.startswith("resnet8_tiny")][0]
    assert line.split()[3] == "1/3" and line.split()[4] == f"{speed:,.0f}" and "its run" in line


@pytest.mark.ci  # slow and needed: .ci/run runs it (pyproject's markers)
def test_run_table_spreads_cells_over_parallel_workers(tmp_path):
    """Two workers take cells from one queue (a rerun skipping finished cells is tested in test_cli.py)."""
    # PYTHON: this interpreter, which need not be the first python on PATH (a venv not activated)
    env = {**os.environ, "GPUS": "cpu cpu", "METHODS": "pcl dml", "BACKBONES": "resnet8_tiny", "PYTHON": sys.executable}
    args = ["bash", str(REPO / "run_table.sh"), "quickstart", "0", "device=cpu", "data.train_subset=128",
            "train.batch_size=64", "train.epochs=1", "schedule.milestones=[]", f"output.root={tmp_path}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 cell(s) on cpu cpu (2 at a time)" in proc.stdout
    assert "of training left on one device" in proc.stdout  # the estimate came first
    for method in ("pcl", "dml"):
        assert f"[cpu] done  quickstart_resnet8_tiny_{method}_seed0" in proc.stdout
        assert (tmp_path / f"quickstart_resnet8_tiny_{method}_seed0" / "last.pt").is_file()
    assert "| backbone | DML | PCL |" in proc.stdout  # the report of both cells at the end


def test_device_defaults_on_cpu(monkeypatch, tmp_path):
    cfg = load_config(QUICKSTART)
    monkeypatch.setenv("OKD_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    run, lines = devices.resolve_auto(cfg, torch.device("cpu"))
    # resnet8_tiny's 8-channel 1x1 stride-2 shortcut keeps the quickstart in NCHW on a CPU (okd.devices)
    assert (run.train.precision, run.train.channels_last, run.train.batched_branches, run.train.cuda_graphs,
            run.method.fused_views) == ("fp32", False, False, False, False)
    assert cfg.train.precision == "auto" and cfg.train.channels_last is None  # what was asked stays
    assert "device defaults: precision fp32" in lines[0]
    wider, _ = devices.resolve_auto(load_config(QUICKSTART, ["model.name=resnet32"]), torch.device("cpu"))
    assert wider.train.channels_last is True  # a backbone without the hazard: channels_last
    # with native bf16 the probe decides, once per CPU model / torch / threads (then from the cache)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_bf16"})
    probes = []
    monkeypatch.setattr(hardware, "_probe_bf16", lambda: probes.append(1) or 2.0)
    assert devices.resolve_auto(cfg, torch.device("cpu"))[0].train.precision == "bf16"
    assert devices.resolve_auto(cfg, torch.device("cpu"))[0].train.precision == "bf16" and len(probes) == 1
    (tmp_path / "cpu_bf16_probe.json").unlink()
    monkeypatch.setattr(hardware, "_probe_bf16", lambda: 1.05)  # not clearly faster: stay in fp32
    assert devices.resolve_auto(cfg, torch.device("cpu"))[0].train.precision == "fp32"
    # explicit values are never changed
    explicit = load_config(QUICKSTART, ["train.precision=fp16", "train.channels_last=false"])
    run, _ = devices.resolve_auto(explicit, torch.device("cpu"))
    assert (run.train.precision, run.train.channels_last) == ("fp16", False)


def test_a_run_written_with_explicit_values_resumes_under_auto(tmp_path, monkeypatch):
    assert main([*QUICK, "train.precision=fp32", "train.channels_last=false", f"output.root={tmp_path}",
                 "--save_dir", "old"]) == 0
    # the same experiment under the defaults, on a CPU where auto means fp32 + NCHW for resnet8_tiny
    monkeypatch.setenv("OKD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    key = f"{hardware.cpu_name()} | torch {torch.__version__} | threads {torch.get_num_threads()}"
    (tmp_path / "cache" / "cpu_bf16_probe.json").write_text(json.dumps({key: 0.5}))
    assert main([*QUICK, "train.epochs=2", f"output.root={tmp_path}", "--save_dir", "old"]) == 0
    lines = (tmp_path / "old" / "log.txt").read_text()
    assert "resumed from" in lines and "epoch 2/2" in lines


def test_peak_tflops_of_known_gpus_from_their_data_sheets():
    assert hardware.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert hardware.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM figure
    assert hardware.peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert hardware.peak_tflops("Intel(R) Xeon(R) Processor", "fp32") is None
