"""The results-table tool on synthetic run directories: means, stds, counts and markers by hand."""
import csv
import io
import json

import pytest
import yaml

from okd.report import main


def fake_run(root, dataset, backbone, method, seed, curve, epochs=None, extra=None, tag=""):
    run = root / f"{dataset}_{backbone}_{method}{tag}_seed{seed}"
    run.mkdir(parents=True)
    cfg = {"seed": seed, "data": {"name": dataset}, "model": {"name": backbone}, "method": {"name": method},
           "train": {"epochs": epochs or len(curve)}}
    for key, value in (extra or {}).items():
        cfg.setdefault(key, {}).update(value)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.dumps({"epoch": e + 1, "summary": {"reported": {"last": v, "best": max(curve[:e + 1])}}})
             for e, v in enumerate(curve)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # dml/resnet32: best 70 and 74 -> mean 72, sample std sqrt(8) = 2.83; last 69 and 73 -> 71, 2.83
    fake_run(root, "cifar100", "resnet32", "dml", 0, [60.0, 70.0, 69.0])
    fake_run(root, "cifar100", "resnet32", "dml", 1, [65.0, 74.0, 73.0])
    # pcl/resnet32: one seed
    fake_run(root, "cifar100", "resnet32", "pcl", 0, [50.0, 75.5, 75.0])
    # pcl/vgg16: unfinished only (2 of 5 epochs) -> "running (1)"; dml/vgg16 missing -> "—"
    fake_run(root, "cifar100", "vgg16", "pcl", 0, [40.0, 41.0], epochs=5)
    # a run moved aside by --overwrite is ignored
    old = fake_run(root, "cifar100", "resnet32", "pcl", 7, [99.0, 99.0, 99.0])
    old.rename(old.with_name(old.name + ".replaced-20260101-000000"))
    return root


def test_markdown_table(runs, capsys):
    assert main([str(runs)]) == 0
    out = capsys.readouterr().out
    best, last = out.split("last epoch")[0], out.split("last epoch")[1]
    assert "| backbone | DML | PCL |" in best
    assert "| resnet32 | 72.00 ± 2.83 (n=2) | 75.50 (n=1) |" in best
    assert "| vgg16 | — | running (1) |" in best
    assert "| resnet32 | 71.00 ± 2.83 (n=2) | 75.00 (n=1) |" in last
    assert "99.00" not in out
    # rows in the paper's backbone order
    assert best.index("| resnet32 |") < best.index("| vgg16 |")


def test_csv_and_unfinished(runs, capsys):
    assert main([str(runs), "--format", "csv", "--include-unfinished"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    by = {(r["backbone"], r["method"], r["variant"]): r for r in rows}
    dml = by[("resnet32", "dml", "best")]
    assert float(dml["mean"]) == 72.0 and float(dml["std"]) == pytest.approx(8 ** 0.5, abs=1e-4)
    assert dml["n"] == "2" and dml["seeds"] == "0 1" and dml["unfinished"] == "0"
    vgg = by[("vgg16", "pcl", "last")]
    assert float(vgg["mean"]) == 41.0 and vgg["n"] == "1" and vgg["unfinished"] == "1"


def test_figure_and_errors(runs, tmp_path, capsys):
    png = tmp_path / "figs" / "curves.png"
    assert main([str(runs), "--figure", str(png), "--backbone", "resnet32"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(runs), "--figure", str(png)]) == 2
    assert main([str(tmp_path / "nowhere")]) == 2
    assert main([str(runs), "--dataset", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "needs --backbone" in err and "does not exist" in err and "no okd runs" in err


def test_reads_a_real_run(tmp_path, capsys):
    """The tool reads what the trainer writes (a one-epoch quickstart-sized run)."""
    from okd.cli import main as train

    assert train(["--method", "dml", "--model", "resnet8_tiny", "data.name=digits", "train.epochs=1", "schedule.milestones=[]",
                  "train.batch_size=256", f"output.root={tmp_path}", "device=cpu", "data.train_subset=512",
                  "data.test_subset=128"]) == 0
    capsys.readouterr()
    assert main([str(tmp_path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {(r["dataset"], r["backbone"], r["method"], r["n"]) for r in rows} == {("digits", "resnet8_tiny", "dml", "1")}


def test_reads_metrics_of_both_versions_alike(tmp_path, capsys):
    """metrics_version 1 (raw terms, no kd_weight) and 2 (weighted terms) run directories in one table."""
    from okd.metrics import read_metrics

    old = fake_run(tmp_path, "cifar10", "resnet32", "pcl", 0, [50.0, 60.0])
    v1 = [{"epoch": 1, "train": {"loss": {"total": 9.0, "ce_peers": 6.0, "kd_mean": 100.0}},
           "summary": {"reported": {"last": 50.0}}},
          {"epoch": 2, "train": {"loss": {"total": 8.0, "ce_peers": 5.0, "kd_mean": 90.0}},
           "summary": {"reported": {"last": 60.0}}}]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v1))
    new = fake_run(tmp_path, "cifar10", "resnet32", "pcl", 1, [54.0, 64.0])
    v2 = [{"metrics_version": 2, "epoch": e, "train": {"loss": {"total": 7.0, "ce_peers": 5.0, "kd_mean": 2.0},
                                                      "kd_weight": 0.02}, "summary": {"reported": {"last": v}}}
          for e, v in ((1, 54.0), (2, 64.0))]
    (new / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v2) + '{"epoch": 3, "tra')
    first_old, first_new = read_metrics(old)[0], read_metrics(new)[0]
    assert first_old["metrics_version"] == 1 and first_old["train"]["kd_weight"] is None
    assert first_old["train"]["loss"] == {"total": 9.0}  # raw terms are not passed off as weighted ones
    assert first_old["train"]["loss_unweighted"] == {"ce_peers": 6.0, "kd_mean": 100.0}
    assert first_new["train"]["loss"] == {"total": 7.0, "ce_peers": 5.0, "kd_mean": 2.0}
    assert len(read_metrics(new)) == 2  # the torn line of a killed run is skipped
    assert main([str(tmp_path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    best = [r for r in rows if r["variant"] == "best"][0]
    assert best["n"] == "2" and float(best["mean"]) == 62.0  # (60 + 64) / 2


def test_the_later_papers_numbers_are_printed_beside_okds_runs_with_their_source(tmp_path, capsys):
    root = tmp_path / "runs"
    fake_run(root, "cifar100", "resnet32", "mcl", 0, [60.0, 71.0])
    fake_run(root, "cifar100", "switokd_wrn16_2+mobilenetv2", "switokd", 0, [50.0, 66.0])
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    published = out.split("published top-1 % of these cells")[1]
    # MCL's README table: x2 and x4 rows, each with its setting and protocol; okd's best beside
    assert "| resnet32 | MCL | 72.96 | 71.00 (n=1) | 2 networks, best network at the best test epoch" in published
    assert "| resnet32 | MCL | 74.04 |" in published and "4 networks sharing stem and stage 1" in published
    # SwitOKD's pair: the student's and the teacher's numbers, labelled by role
    assert "| switokd_wrn16_2+mobilenetv2 | SwitOKD | 67.24 | 66.00 (n=1) | student mobilenetv2" in published
    assert "| switokd_wrn16_2+mobilenetv2 | SwitOKD | 73.90 |" in published and "teacher switokd_wrn16_2" in published
    assert "| resnet32 | MCL | 73.68" not in published  # PCL's DML number is not MCL's


def test_runs_with_the_authors_recipe_get_their_own_column(tmp_path, capsys):
    """MCL on the common protocol and with its authors' recipe (cosine, class-balanced batches) are not averaged
    together; a run with only the cosine schedule is a third, mixed column."""
    fake_run(tmp_path, "cifar100", "resnet32", "mcl", 0, [70.0, 72.0], extra={"schedule": {"name": "multistep"}})
    fake_run(tmp_path, "cifar100", "resnet32", "mcl", 1, [71.0, 74.0], extra={"schedule": {"name": "multistep"}})
    fake_run(tmp_path, "cifar100", "resnet32", "mcl", 0, [72.0, 76.0], extra={"schedule": {"name": "cosine"},
                                                                              "data": {"sampler": "m_per_class"}},
             tag="_authors")
    assert main([str(tmp_path)]) == 0
    best = capsys.readouterr().out.split("last epoch")[0]
    assert "| backbone | MCL | MCL (authors' recipe) |" in best
    assert "| resnet32 | 73.00 ± 1.41 (n=2) | 76.00 (n=1) |" in best
    fake_run(tmp_path, "cifar100", "resnet32", "mcl", 0, [60.0, 61.0], extra={"schedule": {"name": "cosine"}},
             tag="_cosine")
    assert main([str(tmp_path)]) == 0
    assert "| MCL (mixed (not the authors': data.sampler)) |" in capsys.readouterr().out
    assert main([str(tmp_path), "--format", "csv"]) == 0
    rows = [r for r in csv.DictReader(io.StringIO(capsys.readouterr().out)) if r["variant"] == "best"]
    assert sorted((r["method"], r["recipe"], r["mean"]) for r in rows) == [
        ("mcl", "authors' recipe", "76.0000"), ("mcl", "common protocol", "73.0000"),
        ("mcl", "mixed (not the authors': data.sampler)", "61.0000")]
