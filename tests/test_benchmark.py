"""The throughput benchmark runs end to end and reports in the documented format (not a timing test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_reports_ratios_and_last_line(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/throughput.py"), "--model", "resnet8_tiny", "--batch-size", "16",
         "--rounds", "2", "--steps", "1", "--warmup", "1", "--workers", "1", "--threads", "1",
         "--variants", "okd,okd+fused+batched", "--fast", "okd+fused+batched", "--images", "64", "--settle", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("speedup_vs_reference=")
    result = json.loads(out.read_text())
    train = result["train_step"]
    assert set(train) == {"reference", "okd", "okd+fused+batched"}
    assert train["reference"]["ratio_to_reference"] == 1.0
    assert all(len(v["rounds"]) == 2 and v["min_img_per_s"] <= v["median_img_per_s"] <= v["max_img_per_s"]
               for v in train.values())
    ratio = train["okd+fused+batched"]["median_img_per_s"] / train["reference"]["median_img_per_s"]
    assert float(last.split("=")[1]) == round(ratio, 2)
    assert result["data_pipeline"]["okd"]["median_img_per_s"] > 0
    # hardware use: the counted FLOPs of a step times the measured steps per second
    flops = result["step_flops"]
    assert flops > 0
    for v in train.values():
        assert v["tflop_per_s"] == pytest.approx(flops * v["median_img_per_s"] / 16 / 1e12)
    assert "GFLOP per batch of 16" in proc.stdout and "okd+auto on this device: precision" in proc.stdout
    assert train["okd"]["graph"] is None and train["okd"]["peak_memory_bytes"] is None  # no graph, no CUDA memory
    assert result["fastest_variant"] in ("okd", "okd+fused+batched")


def test_benchmark_says_whether_each_variant_ran_as_a_graph_and_measures_auto_once(tmp_path):
    """A variant that asked for graphs but ran eagerly must not pass for the speed of graphs; okd+auto
    is measured once when it resolves to a listed variant (on a CPU for resnet8_tiny: NCHW, fp32); a
    variant that a run refuses here (channels_last over resnet8_tiny's oneDNN hazard) is skipped, saying why."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/throughput.py"), "--model", "resnet8_tiny", "--batch-size", "16",
         "--rounds", "1", "--steps", "1", "--warmup", "1", "--workers", "1", "--threads", "1",
         "--variants", "okd,okd+cl,okd+graphs", "--images", "32", "--settle", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["train_step"]) == {"reference", "okd", "okd+graphs"} and result["fast_variant"] == "okd"
    assert "okd+auto on this device is okd: measured once" in proc.stdout
    assert "skipping okd+cl: a run refuses it here: train.channels_last=true on a CPU" in proc.stdout
    assert "uxlfoundation/oneDNN#6035" in result["refused_variants"]["okd+cl"]
    graph = result["train_step"]["okd+graphs"]["graph"]
    assert graph["captured"] is False and graph["off_reason"] == "not used on cpu"
    assert "warning: okd+graphs runs eagerly, not as a graph: not used on cpu" in proc.stdout
    assert "EAGER" in proc.stdout  # the table's graph column


def test_data_benchmark_compares_the_streaming_path_with_imagefolder(tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/data_throughput.py"), "--images", "16",
                           "--batch-size", "8", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ratio_vs_reference=")
    result = json.loads(out.read_text())
    assert result["images"] == 16 and result["views"] == 3
    for side in ("reference", "okd"):
        r = result["results"][side]
        assert len(r["rounds"]) == 2 and r["min"] <= r["median_img_per_s_per_core"] <= r["max"]
    assert result["ratio"] == pytest.approx(result["results"]["okd"]["median_img_per_s_per_core"]
                                            / result["results"]["reference"]["median_img_per_s_per_core"])


def test_view_augment_benchmark_times_okdphs_views_against_the_default_ones(tmp_path):
    out = tmp_path / "views.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/view_augment.py"), "--batch-size", "16",
                           "--batches", "1", "--rounds", "2", "--no-step", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ratio_vs_reference=")
    result = json.loads(out.read_text())
    assert result["views"] == 3 and result["default_ms"] > 0 and result["okdph_views_ms"] > 0
    assert result["okdph_step_ms"] is None


def test_diagnostics_cost_benchmark_times_the_evaluation_with_and_without_the_sums():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/diagnostics_cost.py"), "--model", "resnet8_tiny",
                           "--images", "40", "--batch-size", "20", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ratio_vs_reference=")


def test_the_cuda_variants_measure_every_combination_of_fused_views_and_batched_branches_with_and_without_graphs():
    """What the device defaults must be chosen from: batching pays when launches dominate, maybe not in a graph."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    flags = {frozenset(v.split("+")[1:]) for v in throughput.DEFAULT_VARIANTS["cuda"].split(",")}
    for fused in ("fused", None):
        for batched in ("batched", None):
            for graphs in ("graphs", None):
                wanted = frozenset(f for f in ("cl", "bf16", fused, batched, graphs) if f)
                assert wanted in flags, sorted(wanted)
