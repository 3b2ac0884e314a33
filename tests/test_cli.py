"""End to end through the command line: outputs, resume, determinism, refusals and error paths."""
import contextlib
import math

import pytest
import torch
from conftest import REPO, records, run_cli, tree_digest

import okd
from okd import checkpoint_file
from okd.cli import main
from okd.config import DataConfig
from okd.data import Normalizer, load_dataset
from okd.methods import METHODS

TINY = ["data.train_subset=192", "data.test_subset=96", "train.batch_size=64", "train.eval_batch_size=50",
        "method.rampup_epochs=2", "schedule.milestones=[1]", "train.log_every=2", "device=cpu"]


def args(tmp_path, *extra, name="run"):
    return ["--config", str(REPO / "configs/quickstart.yml"), "--save_dir", name,
            f"output.root={tmp_path}", *TINY, *extra]





def test_cli_run_writes_labelled_outputs(tmp_path):
    proc = run_cli(*args(tmp_path, "train.epochs=1"))
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    assert "final | temporal-mean peer 1 (paper protocol): last" in proc.stdout
    log = (run_dir / "log.txt").read_text()
    assert "command: main.py" in log and "torch " in log and "device cpu" in log and "git " in log
    assert "recipe: common protocol (docs/methods.md §17)" in log  # PCL's authors trained with it

    (rec,) = records(run_dir)
    assert rec["epoch"] == 1 and rec["step"] == 3  # 192 images / 64
    assert set(rec["val"]["top1"]) >= {"peer1", "peer2", "peer3", "ensemble", "mean_peer1", "mean_peer2", "mean_peer3"}
    assert rec["summary"]["reported"]["label"] == "temporal-mean peer 1 (paper protocol)"
    assert rec["summary"]["reported"]["last"] == rec["val"]["top1"]["mean_peer1"]
    assert rec["summary"]["best_mean_peer"]["last"] == max(rec["val"]["top1"][f"mean_peer{j}"] for j in (1, 2, 3))
    assert set(rec["train"]["loss"]) == {"ce_ensemble", "ce_peers", "kd_ensemble", "kd_mean", "total"}
    # metrics version 2: the logged terms are weighted and add up to the total; the KD weight is logged
    loss = rec["train"]["loss"]
    assert rec["metrics_version"] == 2
    assert loss["total"] == pytest.approx(sum(v for k, v in loss.items() if k != "total"), rel=1e-6)
    assert rec["train"]["kd_weight"] == pytest.approx(math.exp(-5.0), rel=1e-12)  # epoch 0 of a 2-epoch ramp-up

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lr", "train/kd_weight", "train/loss/total", "train/loss/kd_mean", "val/acc/mean_peer1", "val/acc/ensemble",
            "val/summary/reported"} <= tags
    assert events.Scalars("val/acc/mean_peer1")[0].value == pytest.approx(rec["val"]["top1"]["mean_peer1"])

    # best.pt holds the reported model: evaluating it independently reproduces the logged accuracy
    model = okd.load_model(run_dir / "best.pt")
    data = load_dataset(DataConfig(name="digits", test_subset=96))
    with torch.no_grad():
        pred = model(Normalizer(data.mean, data.std, "cpu")(data.test.images)).argmax(1)
    acc = 100.0 * (pred == data.test.labels).float().mean().item()
    assert acc == pytest.approx(rec["summary"]["reported"]["best"], abs=1e-3)

    # rerunning the same command does not retrain a finished run
    before = tree_digest(run_dir / "tb"), (run_dir / "metrics.jsonl").read_text()
    again = run_cli(*args(tmp_path, "train.epochs=1"))
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before[1]


def test_same_command_twice_gives_identical_results(tmp_path):
    assert main(args(tmp_path, "train.epochs=2", name="a")) == 0
    assert main(args(tmp_path, "train.epochs=2", name="b")) == 0
    ra, rb = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["val"] for r in ra] == [r["val"] for r in rb]
    assert [r["train"]["loss"] for r in ra] == [r["train"]["loss"] for r in rb]
    sa = checkpoint_file.load(tmp_path / "a" / "last.pt")["method_state"]
    sb = checkpoint_file.load(tmp_path / "b" / "last.pt")["method_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_is_bitwise_equal_to_straight_run(tmp_path):
    assert main(args(tmp_path, "train.epochs=2", name="straight")) == 0
    assert main(args(tmp_path, "train.epochs=1", name="resumed")) == 0
    assert main(args(tmp_path, "train.epochs=2", name="resumed")) == 0  # same command, more epochs
    a = checkpoint_file.load(tmp_path / "straight" / "last.pt")
    b = checkpoint_file.load(tmp_path / "resumed" / "last.pt")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 6)
    assert a["method_state"].keys() == b["method_state"].keys()
    for k in a["method_state"]:  # weights, temporal mean and BN buffers
        assert torch.equal(a["method_state"][k], b["method_state"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert [r["epoch"] for r in records(tmp_path / "resumed")] == [1, 2]
    assert [r["val"] for r in records(tmp_path / "resumed")] == [r["val"] for r in records(tmp_path / "straight")]


def test_different_config_is_refused_and_overwrite_moves_aside(tmp_path, capsys):
    assert main(args(tmp_path, "train.epochs=1")) == 0
    digest = tree_digest(tmp_path / "run")
    assert main(args(tmp_path, "train.epochs=1", "optim.lr=0.2")) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a different experiment (optim.lr: 0.05 -> 0.2)" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert tree_digest(tmp_path / "run") == digest  # untouched
    assert main(args(tmp_path, "train.epochs=1", "optim.lr=0.2", "--overwrite")) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and tree_digest(moved[0]) == digest


def test_overwrite_with_a_mistake_leaves_the_old_run_untouched(tmp_path, capsys):
    assert main(args(tmp_path, "train.epochs=1")) == 0
    digest = tree_digest(tmp_path / "run")
    assert main(args(tmp_path, "train.epochs=1", "train.batch_size=100000", "--overwrite")) == 2
    assert main(args(tmp_path, "train.epochs=1", "method.temperature=-1", "--overwrite")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and tree_digest(tmp_path / "run") == digest


def test_finished_run_is_skipped_without_loading_data(tmp_path, capsys, monkeypatch):
    assert main(args(tmp_path, "train.epochs=1")) == 0
    capsys.readouterr()

    def no_data(*a, **k):
        raise AssertionError("a finished run must not load its dataset")

    monkeypatch.setattr("okd.build.load_dataset", no_data)
    assert main(args(tmp_path, "train.epochs=1")) == 0
    assert "already finished (1/1 epochs)" in capsys.readouterr().out


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "pcl"])  # pcl: the tests above
def test_every_method_runs_and_resumes_from_the_command_line(tmp_path, method):
    """One epoch, then a second by rerunning with more epochs: labelled summaries and a loadable model."""
    base = ["--config", str(REPO / "configs/quickstart.yml"), "--save_dir", "run", f"output.root={tmp_path}",
            "--method", method, *[a for a in TINY if not a.startswith("method.")]]
    extra = ["method.rampup_epochs=2"] if method in ("one", "ffl", "okddip", "ahbf") else []
    assert main([*base, "train.epochs=1", *extra]) == 0
    assert main([*base, "train.epochs=2", *extra]) == 0
    recs = records(tmp_path / "run")
    assert [r["epoch"] for r in recs] == [1, 2]
    assert "reported" in recs[-1]["summary"]
    model = okd.load_model(tmp_path / "run" / "best.pt")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_resume_flag_and_checkpoint_mismatch(tmp_path, capsys):
    assert main(args(tmp_path, "train.epochs=1", name="src")) == 0
    assert main(args(tmp_path, "train.epochs=2", "--resume", str(tmp_path / "src" / "last.pt"), name="dst")) == 0
    assert [r["epoch"] for r in records(tmp_path / "dst")] == [2]
    capsys.readouterr()
    code = main(args(tmp_path, "train.epochs=2", "model.name=resnet32", "--resume",
                     str(tmp_path / "src" / "last.pt"), name="other"))
    assert code == 2
    assert "is for model name 'resnet8_tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["bad_flag", "missing_data", "unknown_model", "bad_key", "corrupt_ckpt", "not_ckpt",
                                  "cuda", "not_a_run", "batch_too_big", "num_classes"])
def test_user_errors_are_one_line_exit_2(tmp_path, case, capsys):
    """In this process (tests/test_bad_inputs.py has 50 more); the test below runs two in a real process."""
    extra, env = [], {}
    if case == "bad_flag":
        extra = ["--seed", "abc"]
    elif case == "missing_data":
        extra = ["data.name=cifar10", f"data.root={tmp_path / 'nodata'}"]
    elif case == "unknown_model":
        extra = ["--model", "resnet33"]
    elif case == "bad_key":
        extra = ["train.epohcs=3"]
    elif case in ("corrupt_ckpt", "not_ckpt"):
        bad = tmp_path / "bad.pt"
        if case == "corrupt_ckpt":
            bad.write_bytes(b"PK\x03\x04 truncated")
        else:
            torch.save({"weights": torch.zeros(2)}, bad)
        extra = ["--resume", str(bad)]
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        extra = ["--device", "cuda"]
    elif case == "not_a_run":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "notes.txt").write_text("mine")
    elif case == "batch_too_big":
        extra = ["train.batch_size=1000"]
    elif case == "num_classes":
        extra = ["model.num_classes=100"]
    with pytest.raises(SystemExit) if case == "bad_flag" else contextlib.nullcontext() as exited:
        code = main(args(tmp_path, "train.epochs=1", *extra))
    code = exited.value.code if case == "bad_flag" else code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("okd: error: "), err
    if case == "not_a_run":
        assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    else:
        assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("extra", [["--seed", "abc"], ["train.epohcs=3"]], ids=["bad_flag", "bad_key"])
def test_a_user_error_in_a_real_process_is_one_line_exit_2_without_a_traceback(tmp_path, extra):
    proc = run_cli(*args(tmp_path, "train.epochs=1", *extra))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("okd: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_flag_cannot_write_into_another_experiment(tmp_path, capsys):
    assert main(args(tmp_path, "train.epochs=1", name="src")) == 0
    assert main(args(tmp_path, "train.epochs=1", "optim.lr=0.3", name="other")) == 0
    digest = tree_digest(tmp_path / "other")
    capsys.readouterr()
    code = main(args(tmp_path, "train.epochs=2", "--resume", str(tmp_path / "src" / "last.pt"), name="other"))
    assert code == 2 and "holds a different experiment" in capsys.readouterr().err
    assert tree_digest(tmp_path / "other") == digest


def test_mcl_trains_on_class_balanced_batches_from_the_command_line(tmp_path):
    """data.sampler m_per_class through the whole run: 8 classes x 8 digits a batch, floor(192 / 64) = 3 steps an
    epoch, the same after a resume; the log names the recipe (the authors' sampler, not their cosine schedule)."""
    extra = ["--method", "mcl", "data.sampler=m_per_class", "data.m_per_class=8", "method.rampup_epochs=0"]
    assert main(args(tmp_path, "train.epochs=1", *extra)) == 0
    assert main(args(tmp_path, "train.epochs=2", *extra)) == 0
    assert [(r["epoch"], r["step"]) for r in records(tmp_path / "run")] == [(1, 3), (2, 6)]
    assert "recipe: mixed (not the authors': schedule.name)" in (tmp_path / "run" / "log.txt").read_text()


def test_a_sampler_that_cannot_draw_its_batches_is_refused_before_the_run_directory(tmp_path, capsys):
    """10 digit classes cannot fill 64 classes x 2 a batch: one line, exit 2, and no run directory to clean up."""
    assert main(args(tmp_path, "train.epochs=1", "--method", "mcl", "data.sampler=m_per_class",
                     "train.batch_size=128")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "draws 64 classes per batch" in err and "raise data.m_per_class" in err
    assert not (tmp_path / "run").exists()
    assert main(args(tmp_path, "train.epochs=1", "data.views=[crop+flip, crop]")) == 2  # PCL has 3 views
    assert "lists 2 recipes but method pcl trains on 3 view(s)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
