"""Diversity and calibration at every evaluation (okd.diagnostics): hand-worked values on four images, the member
groups of every method, and the figures in a real run's metrics.jsonl."""
import math

import pytest
import torch
from conftest import QUICKSTART, records

from okd.diagnostics import Diagnostics, numbered_groups

# two members, three classes, four images; every confidence lies inside one of the 15 bins (none on k/15)
A = [[0.70, 0.20, 0.10], [0.10, 0.62, 0.28], [0.28, 0.27, 0.45], [0.50, 0.40, 0.10]]
B = [[0.58, 0.32, 0.10], [0.22, 0.20, 0.58], [0.20, 0.50, 0.30], [0.35, 0.55, 0.10]]
LABELS = [0, 2, 2, 1]


def result():
    outputs = {"net1": torch.tensor(A).log(), "net2": torch.tensor(B).log()}
    d = Diagnostics(["net1", "net2"], {"net": ["net1", "net2"]}, "cpu")
    labels = torch.tensor(LABELS)
    d.add({k: v[:3] for k, v in outputs.items()}, labels[:3])  # two batches: the sums carry over
    d.add({k: v[3:] for k, v in outputs.items()}, labels[3:])
    top1 = {"net1": 50.0, "net2": 75.0}  # a: images 0 and 2 right; b: 0, 1 and 3
    return d.result(4, top1)


def test_diversity_by_hand():
    group = result()["groups"]["net"]
    # top-1 classes a: 0, 1, 2, 0; b: 0, 2, 1, 1 -> they differ on 3 of 4 images
    assert group["disagreement"] == pytest.approx(75.0) and group["disagreement_matrix"] == [[0.0, 75.0], [75.0, 0.0]]
    # averaged probabilities: [.64 .26 .10], [.16 .41 .43], [.24 .385 .375], [.425 .475 .10] -> 0, 2, 1, 1: 3 right
    assert group["ensemble_top1"] == pytest.approx(75.0) and group["ensemble_gain"] == pytest.approx(75.0 - 62.5)
    kl_ab = sum(sum(p * math.log(p / q) for p, q in zip(a, b)) for a, b in zip(A, B)) / 4
    kl_ba = sum(sum(q * math.log(q / p) for p, q in zip(a, b)) for a, b in zip(A, B)) / 4
    assert group["kl"] == pytest.approx((kl_ab + kl_ba) / 2, rel=1e-6)


def test_calibration_by_hand():
    a = result()["calibration"]["net1"]
    # one image per bin: ECE = mean |correct - confidence| = (|1 - .7| + |0 - .62| + |1 - .45| + |0 - .5|) / 4
    assert a["ece"] == pytest.approx(100 * 1.97 / 4, rel=1e-6)
    assert a["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.28) + math.log(0.45) + math.log(0.4)) / 4, rel=1e-6)
    # Brier per image: .14, .9128, .4538, .62
    assert a["brier"] == pytest.approx((0.14 + 0.9128 + 0.4538 + 0.62) / 4, rel=1e-6)
    # two images sharing a bin: their gaps net out inside it (b's confidences .58, .58 share bin 8)
    b = result()["calibration"]["net2"]
    correct_b, conf_b = [1, 1, 0, 1], [0.58, 0.58, 0.50, 0.55]
    bins = {}
    for c, p in zip(correct_b, conf_b):
        k = math.ceil(p * 15) - 1
        bins.setdefault(k, []).append((c, p))
    ece = sum(abs(sum(c for c, _ in v) - sum(p for _, p in v)) for v in bins.values()) / 4
    assert sorted(bins) == [7, 8] and b["ece"] == pytest.approx(100 * ece, rel=1e-6)


def test_every_method_measures_its_members():
    import okd
    from okd.methods import METHODS, build_method
    from okd.models import backbone_spec

    expected = {"vanilla": set(), "dml": {"net"}, "kdcl": {"net"}, "mcl": {"net"}, "okdph": {"net"},
                "cl": {"branch"}, "one": {"branch"}, "ffl": {"branch"}, "okddip": {"peer"},
                "pcl": {"peer", "mean_peer"}, "switokd": {"pair"}, "ahbf": {"branch"}}
    assert set(expected) == set(METHODS.names())
    for name, groups in expected.items():
        torch.manual_seed(0)
        method = build_method(name, backbone_spec("resnet8_tiny", 10), 10, METHODS.get(name).Options()).eval()
        names = list(method.evaluate_logits(torch.randn(2, 3, 32, 32)))
        chosen = method.diagnostic_groups(names)
        assert set(chosen) == groups, name
        assert all(len(m) >= 2 and set(m) <= set(names) for m in chosen.values()), name
    assert numbered_groups(["branch2", "branch10", "net"]) == {"branch": ["branch2", "branch10"]}
    del okd


def test_a_run_logs_the_diagnostics_at_every_evaluation(tmp_path):
    from okd.cli import main

    assert main(["--config", str(QUICKSTART), "--save_dir", "run", f"output.root={tmp_path}", "train.epochs=1",
                 "data.train_subset=128", "data.test_subset=64", "train.batch_size=64", "schedule.milestones=[]",
                 "method.rampup_epochs=2", "device=cpu"]) == 0
    val = records(tmp_path / "run")[-1]["val"]
    groups, calibration = val["diagnostics"]["groups"], val["diagnostics"]["calibration"]
    assert set(groups) == {"peer", "mean_peer"} and groups["peer"]["members"] == ["peer1", "peer2", "peer3"]
    assert 0 <= groups["peer"]["disagreement"] <= 100 and groups["peer"]["kl"] >= 0
    assert len(groups["peer"]["disagreement_matrix"]) == 3
    assert groups["peer"]["ensemble_gain"] == pytest.approx(
        groups["peer"]["ensemble_top1"] - sum(val["top1"][f"peer{j}"] for j in (1, 2, 3)) / 3)
    assert set(calibration) == set(val["top1"]) and all(0 <= c["ece"] <= 100 for c in calibration.values())
