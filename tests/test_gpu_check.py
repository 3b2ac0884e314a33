"""The GPU check and its preflight, run on a CPU as they run on the GPU machine (the preflight through
okd.cuda_standin): the record comes first, every file lands under $OUT as it goes, the training stops
at its hard limit and still leaves its log and a record of its last finished epoch, a failed preflight
still trains (eagerly) and labels the record, and no record means exit 1 and a last line that says so."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, synthetic_image

from okd import cuda_standin, preflight


def image_folder(root, classes=3, train=40, test=6, size=32):
    from PIL import Image

    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = Path(root) / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(synthetic_image(size, size, 50 * c + i)).save(folder / f"{i}.jpg")
    return Path(root)


def gpu_check(tmp_path, **env):
    out = tmp_path / "out"
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE": "cpu", **env}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=full, timeout=600, cwd=str(tmp_path))
    return proc, out


@pytest.mark.ci
def test_gpu_check_on_cpu_keeps_everything_under_out_when_its_time_limit_stops_the_training(tmp_path):
    data = image_folder(tmp_path / "jpeg")
    proc, out = gpu_check(
        tmp_path, DATA=str(data), BUDGET_S="400", TRAIN_S="25", EPOCHS="10000", N_TRAIN="120", RESERVE_S="30",
        BENCH_MODELS="resnet8_tiny", BENCH_ARGS="--batch-size 16 --rounds 1 --steps 1 --warmup 1 --workers 1 "
                                                "--threads 2 --images 32 --settle 0",
        TRAIN_ARGS="train.batch_size=32 train.threads=2", DATA_BENCH_ARGS="--images 8 --batch-size 4 --rounds 1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # what the device tool returns
    log = (out / "gpu_check.log").read_text()
    assert "check resident graphed via stand-in: ok" in log and "memory pool shared with eager work" in log
    # the record first: preflight, speed probe, training, record, then the benchmarks and the data benchmark
    order = ["gpu_check: preflight passed", "gpu_check: speed probe done", "gpu_check: training PCL resnet8_tiny",
             "training stopped at its time limit (25 s)", "okd-results: wrote ", "gpu_check: benchmark resnet8_tiny done",
             "data benchmark", "gpu_check: finished after"]
    at = [log.find(marker) for marker in order[:-2]] + [log.rfind("ratio_vs_reference="), log.find(order[-1])]
    assert -1 not in at and at == sorted(at), dict(zip(order, at))
    last = log.strip().splitlines()[-1]
    assert last.startswith("gpu_check: finished after") and "record " in last
    report = json.loads((out / "preflight.json").read_text())
    assert report["passed"] and [c["check"] for c in report["checks"]] == ["resident graphed",
                                                                          "streaming (2 workers) graphed"]
    for check in report["checks"]:
        assert check["captured"] and check["replays"] == check["expected_replays"] == 4
        assert check["agreement_gap"] == 0.0 and check["pool_entries"] == 4  # 2 partial batches, 2 evaluations
    assert "preflight: 2 of 2 checks passed" in log and log.startswith("gpu_check: data ")
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench) == {"resnet8_tiny (probe)", "resnet8_tiny"}
    assert bench["resnet8_tiny"]["train_step"]["reference"]["ratio_to_reference"] == 1.0
    assert set(bench["resnet8_tiny (probe)"]["train_step"]) == {"reference", "okd+auto"}
    # okd checkpointed at the limit, inside an epoch ("at epoch N step k") or during its evaluation ("after epoch N")
    assert re.search(r"okd: stopped by SIGTERM (at|after) epoch \d+", log), log[-2000:]
    assert "epoch 1/10000 loss" in (out / "train_log.txt").read_text()
    (record_path,) = [p for p in out.glob("cifar10_resnet8_tiny_pcl_*of10000ep_scaled_seed0.json")]
    record = json.loads(record_path.read_text())
    done = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert record["finished"] is False and record["epochs_done"] == len(done) >= 1
    assert record["reported_best"] == max(r["summary"]["reported"]["last"] for r in done)
    assert record["preflight"] == {"passed": True, "failed": []}
    assert json.loads((out / "data_throughput.json").read_text())["images"] == 8


@pytest.mark.ci  # slow and needed: .ci/run runs it (pyproject's markers)
def test_a_failed_preflight_still_trains_eagerly_and_labels_the_record(tmp_path):
    """The preflight fails its checks (a GPU fault played through the stand-in): the record still comes,
    from a run with train.cuda_graphs=false, and names the failed checks."""
    data = image_folder(tmp_path / "jpeg", train=12, test=4)
    proc, out = gpu_check(tmp_path, DATA=str(data), BUDGET_S="300", EPOCHS="1", N_TRAIN="36", AFTER_S="0",
                          PREFLIGHT_ARGS="--rehearse-fault end", BENCH_MODELS="resnet8_tiny",
                          BENCH_ARGS="--batch-size 16 --rounds 1 --steps 1 --warmup 1 --workers 1 --threads 2 "
                                     "--images 32 --settle 0", TRAIN_ARGS="train.batch_size=12 train.threads=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (out / "gpu_check.log").read_text()
    assert "preflight: 0 of 2 checks passed" in log
    assert "gpu_check: preflight failed (exit 1)" in log and "trains eagerly (train.cuda_graphs=false)" in log
    assert "preflight FAILED: resident graphed: capture failed (RuntimeError: CUDA error" in log
    (record_path,) = out.glob("cifar10_resnet8_tiny_pcl_1ep_scaled_seed0.json")
    record = json.loads(record_path.read_text())
    assert record["finished"] and record["config"]["train"]["cuda_graphs"] is False
    assert record["preflight"]["passed"] is False and len(record["preflight"]["failed"]) == 2
    assert "(preflight failed: 2 check(s))" in log  # the report's device column
    assert log.strip().splitlines()[-1].startswith("gpu_check: finished after") and not (out / "data_throughput.json").exists()


def test_without_a_record_the_gpu_check_exits_1_and_says_so_last(tmp_path):
    proc, out = gpu_check(tmp_path, DEVICE="cuda", DATA=str(tmp_path), AFTER_S="0")  # no CUDA here: nothing trains
    assert proc.returncode == 1
    log = (out / "gpu_check.log").read_text()
    assert "preflight: error: device 'cuda' requested but CUDA is not available here" in log
    assert "gpu_check: preflight failed (exit 2)" in log and "training failed (exit 2)" in log
    last = log.strip().splitlines()[-1]
    assert last.startswith("gpu_check: no record was written (the training left no finished epoch to record)"), last


def test_preflight_fails_in_one_line_per_check_when_the_graph_is_not_captured(tmp_path, capsys):
    assert preflight.main(["--device", "cpu", "--rehearse-fault", "end"]) == 1
    out = capsys.readouterr().out
    assert out.count(": FAILED: NOT captured (capture failed (RuntimeError: CUDA error: operation failed") == 2
    assert "preflight: 0 of 2 checks passed; the CUDA path is not safe to trust here" in out


def test_preflight_fails_when_eager_work_cannot_enter_the_graphs_pool(monkeypatch, capsys):
    """What main's preflight would have shown on a GPU with device=auto: a graph on a bare "cuda"."""
    real = cuda_standin.standin_graphed_step
    monkeypatch.setattr(cuda_standin, "standin_graphed_step",
                        lambda step, device, log, **kw: real(step, torch.device("cuda"), log, **kw))
    assert preflight.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED: captured; 4 replays (expected 4)") == 2
    assert out.count("memory pool NOT shared (ValueError: Expected a torch.device with a specified index") == 2
