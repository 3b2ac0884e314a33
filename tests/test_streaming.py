"""The streaming data path and the image-file datasets (ImageNet, Tiny-ImageNet, ImageFolder at any size).

Trees are generated per test: a few classes, a few JPEGs of 64-256 px. The CPU
channels_last default is turned off in the CLI runs at 64 px: torch 2.14.1's CPU
1x1 stride-2 convolution backward corrupts memory in channels_last when it has
8 input channels and a 64 px map, which resnet8_tiny's first downsample has.
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import REPO, make_imagenet_tree, make_tiny_tree, records, synthetic_image
from PIL import Image

from okd import checkpoint_file
from okd.cli import main
from okd.config import DataConfig
from okd.data import EpochDraws, Normalizer, epoch_order, load_dataset
from okd.data.file_stream import StreamBatches
from okd.data.images import (
    UnreadableImage,
    eval_view,
    pad_crop_flip,
    read_image,
    resized_crop_box,
    resized_crop_flip,
)
from okd.distributed import DistInfo
from okd.errors import DataError

# ---------------------------------------------------------------- decoding and per-image augmentation


def test_jpeg_and_png_decode_like_pil_and_other_formats_fall_back_to_pil(tmp_path):
    picture = synthetic_image(70, 90, 3)
    for name in ("a.jpg", "a.png", "a.bmp"):
        Image.fromarray(picture).save(tmp_path / name)
        reference = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        ours = read_image(str(tmp_path / name))
        assert ours.dtype == torch.uint8 and ours.shape == (3, 70, 90)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), reference), name
    Image.fromarray(picture[:, :, 0]).save(tmp_path / "grey.jpg")  # one channel in, RGB out
    assert read_image(str(tmp_path / "grey.jpg")).shape == (3, 70, 90)


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"\xff\xd8\xff\xe0 truncated", "")])
def test_unreadable_image_names_its_path(tmp_path, content, reason):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(content)
    with pytest.raises(UnreadableImage, match=f"cannot read image '{bad}'.*{reason}"):
        read_image(str(bad))
    with pytest.raises(UnreadableImage, match="No such file"):
        read_image(str(tmp_path / "missing.JPEG"))


def test_pad_crop_flip_is_a_window_of_the_zero_padded_image():
    image = torch.arange(3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 8, 8) + 1
    padded = torch.zeros(3, 12, 12, dtype=torch.uint8)
    padded[:, 2:10, 2:10] = image
    flips_seen = set()
    for seed in range(40):
        out = pad_crop_flip(image, 8, 2, True, torch.Generator().manual_seed(seed))
        matches = [(t, l, f) for t in range(5) for l in range(5) for f in (False, True)
                   if torch.equal(out, padded[:, t:t + 8, l:l + 8].flip(-1) if f else padded[:, t:t + 8, l:l + 8])]
        assert len(matches) == 1
        flips_seen.add(matches[0][2])
    assert flips_seen == {False, True}
    big = pad_crop_flip(torch.zeros(3, 20, 30, dtype=torch.uint8), 8, 2, False, torch.Generator())
    assert big.shape == (3, 8, 8)  # other sizes are resized first


def test_resized_crop_box_follows_torchvision_distribution_and_fallback():
    gen = torch.Generator().manual_seed(0)
    ours = np.array([resized_crop_box(300, 400, (0.08, 1.0), (3 / 4, 4 / 3), gen) for _ in range(3000)])
    torch.manual_seed(0)  # torchvision draws from the global generator
    theirs = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, 300, 400), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(3000)])
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 300).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 400).all()
    area = lambda b: b[:, 2] * b[:, 3] / 120000.0  # noqa: E731
    assert abs(area(ours).mean() - area(theirs).mean()) < 0.03
    assert abs(np.log(ours[:, 3] / ours[:, 2]).mean() - np.log(theirs[:, 3] / theirs[:, 2]).mean()) < 0.05
    # no box of >= 99 % area fits a 10 x 1000 image with the ratio in [3/4, 4/3]: centre crop, ratio clamped
    assert resized_crop_box(10, 1000, (0.99, 1.0), (3 / 4, 4 / 3), gen) == (0, (1000 - 13) // 2, 10, 13)


def test_eval_view_is_the_standard_pil_resize_256_centre_crop_224():
    picture = synthetic_image(200, 300, 5)
    reference = np.array(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.fromarray(picture)))
    image = torch.from_numpy(picture).permute(2, 0, 1).contiguous()
    assert np.array_equal(eval_view(image, "resized_crop", 224).permute(1, 2, 0).numpy(), reference)
    assert eval_view(image, "crop_flip", 64).shape == (3, 64, 64)


def test_resized_crop_flip_output_size():
    image = torch.from_numpy(synthetic_image(90, 130, 1)).permute(2, 0, 1).contiguous()
    out = resized_crop_flip(image, 48, (0.08, 1.0), True, torch.Generator().manual_seed(1))
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8


# ---------------------------------------------------------------- the batch stream


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet"))


def stream_of(tree, workers=0, dist=DistInfo(), views=3, batch=5, augment="resized_crop"):
    data = load_dataset(DataConfig(name="imagenet", root=str(tree), image_size=32, augment=augment, pipeline="stream"))
    normalize = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), "cpu")  # x -> x: raw pixel values
    return StreamBatches(data.train, normalize, views, batch, data.image_size, data.augment, 4, True, (0.08, 1.0),
                         seed=7, device=torch.device("cpu"), workers=workers, dist=dist)


def collect(stream, epoch, start=0):
    return [(b.index, torch.stack(b.views), b.labels) for b in stream.epoch(epoch, start)]


def assert_same_batches(a, b):
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, va, la), (_, vb, lb) in zip(a, b):
        assert torch.equal(va, vb) and torch.equal(la, lb)


@pytest.mark.parametrize("augment", ["resized_crop", "crop_flip"])
def test_stream_is_the_same_with_any_workers_and_resumes_mid_epoch(imagenet_tree, augment):
    single = collect(stream_of(imagenet_tree, augment=augment), epoch=1)
    assert len(single) == 4 and [len(x[2]) for x in single] == [5, 5, 5, 3]  # 18 images, partial batch kept
    assert_same_batches(single, collect(stream_of(imagenet_tree, workers=2, augment=augment), epoch=1))
    assert_same_batches(single[2:], collect(stream_of(imagenet_tree, workers=2, augment=augment), 1, start=2))
    views = single[0][1]
    assert views.shape == (3, 5, 3, 32, 32)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])  # independent views
    assert not torch.equal(views, collect(stream_of(imagenet_tree, augment=augment), epoch=2)[0][1])


def test_stream_order_is_the_resident_order_and_covers_every_image(imagenet_tree):
    stream = stream_of(imagenet_tree)
    order, _ = epoch_order(18, 7, 3)
    assert torch.equal(order, EpochDraws(18, 3, 4, True, 7, 3).order)
    labels = torch.cat([b[2] for b in collect(stream, 3)])
    data = load_dataset(DataConfig(name="imagenet", root=str(imagenet_tree)))
    assert torch.equal(labels, data.train.labels[order])


def test_torchrun_ranks_take_slices_of_the_single_process_batches(imagenet_tree):
    single = collect(stream_of(imagenet_tree, batch=6), epoch=0)
    ranks = [collect(stream_of(imagenet_tree, batch=6, dist=DistInfo(r, 2, r)), epoch=0) for r in range(2)]
    for b, (_, views, labels) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]], dim=1), views)
        assert torch.equal(torch.cat([ranks[0][b][2], ranks[1][b][2]]), labels)


# ---------------------------------------------------------------- datasets and their layouts


def test_imagenet_layout_lists_classes_and_streams_224(imagenet_tree):
    data = load_dataset(DataConfig(name="imagenet", root=str(imagenet_tree)))
    assert data.classes == ["n01", "n02", "n03"] and len(data.train) == 18 and len(data.test) == 9
    assert (data.image_size, data.augment, data.pipeline) == (224, "resized_crop", "stream")
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    assert data.train.path(0).endswith(os.path.join("train", "n01", "n01_0.JPEG"))


def test_tinyimagenet_layout_is_resident_by_default_and_labels_val_from_annotations(tmp_path):
    root = make_tiny_tree(tmp_path / "tiny-imagenet-200")
    data = load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path), cache_dir=str(tmp_path / "c")))
    assert (data.image_size, data.augment, data.pipeline) == (64, "crop_flip", "resident")
    assert data.train.images.shape == (18, 3, 64, 64) and data.num_classes == 3
    assert data.test.labels.tolist() == [i % 3 for i in range(9)]  # val_i is class i % 3
    first_val = np.asarray(Image.open(root / "val" / "images" / "val_0.JPEG").convert("RGB"))
    assert np.array_equal(data.test.images[0].permute(1, 2, 0).numpy(), first_val)
    streamed = load_dataset(DataConfig(name="tinyimagenet", root=str(root), pipeline="stream"))
    assert streamed.pipeline == "stream" and streamed.test.labels.tolist() == data.test.labels.tolist()


def test_imagefolder_at_any_size_measures_its_statistics(tmp_path):
    root = make_imagenet_tree(tmp_path / "tree", sizes=(40, 90))
    data = load_dataset(DataConfig(name="imagefolder", root=str(root), image_size=48, cache_dir=str(tmp_path / "c")))
    assert data.pipeline == "resident" and data.train.images.shape[1:] == (3, 48, 48)
    streamed = load_dataset(DataConfig(name="imagefolder", root=str(root), image_size=48, pipeline="stream"))
    # a streamed tree this small is measured on all of its images: the same statistics
    assert streamed.mean == pytest.approx(data.mean, abs=1e-4) and streamed.std == pytest.approx(data.std, abs=1e-4)


def tiny_setup(root, mistake):
    make_tiny_tree(root)
    notes = root / "val" / "val_annotations.txt"
    if mistake == "no annotations":
        notes.unlink()
    elif mistake == "unknown class":
        notes.write_text(notes.read_text().replace("n02", "n99", 1))
    elif mistake == "missing file":
        notes.write_text(notes.read_text() + "val_77.JPEG\tn01\t0\t0\t1\t1\n")
    elif mistake == "unlabelled image":
        (root / "val" / "images" / "val_0.JPEG").rename(root / "val" / "images" / "extra.JPEG")
        notes.write_text(notes.read_text().replace("val_0.JPEG", "gone.JPEG"))
    elif mistake == "malformed line":
        notes.write_text("just-one-field\n" + notes.read_text())
    elif mistake == "no images folder":
        (root / "train" / "n02" / "images").rename(root / "train" / "n02" / "pics")
    elif mistake == "wnids mismatch":
        (root / "wnids.txt").write_text("n01\nn02\nn03\nn04\n")


@pytest.mark.parametrize("mistake,fragment", [
    ("no annotations", "val_annotations.txt' is missing"),
    ("unknown class", "with class 'n99', which has no folder"),
    ("missing file", "lists 'val_77.JPEG', which is not in"),
    ("unlabelled image", "extra.JPEG' has no line in"),
    ("malformed line", "line 1 is not '<file> <wnid> ...'"),
    ("no images folder", "n02' has no 'images' folder"),
    ("wnids mismatch", "1 only in wnids.txt"),
])
def test_tinyimagenet_layout_errors(tmp_path, mistake, fragment):
    tiny_setup(tmp_path / "tiny", mistake)
    with pytest.raises(DataError, match=fragment):
        load_dataset(DataConfig(name="tinyimagenet", root=str(tmp_path / "tiny"), pipeline="stream"))


@pytest.mark.parametrize("mistake,fragment", [
    ("no val", "val' not found; expected"),
    ("flat val", "holds the validation images directly"),
    ("class mismatch", "1 only in train \\(e.g. n03\\)"),
    ("empty class", "holds no images"),
])
def test_imagenet_layout_errors(tmp_path, mistake, fragment):
    root = make_imagenet_tree(tmp_path / "in", train_per_class=1, val_per_class=1, sizes=(8, 8))
    if mistake == "no val":
        os.rename(root / "val", root / "validation")
    elif mistake == "flat val":
        for wnid in ("n01", "n02", "n03"):
            for f in (root / "val" / wnid).iterdir():
                f.rename(root / "val" / f.name)
            (root / "val" / wnid).rmdir()
    elif mistake == "class mismatch":
        for f in (root / "val" / "n03").iterdir():
            f.unlink()
        (root / "val" / "n03").rmdir()
    elif mistake == "empty class":
        (root / "train" / "n04").mkdir()
        (root / "val" / "n04").mkdir()
    with pytest.raises(DataError, match=fragment):
        load_dataset(DataConfig(name="imagenet", root=str(root)))


@pytest.mark.parametrize("data,fragment", [
    (dict(name="digits", pipeline="stream"), "needs an image-file dataset"),
    (dict(name="digits", augment="resized_crop"), "set data.augment=null"),
    (dict(name="digits", image_size=64), "digits images are 32x32"),
])
def test_resident_only_datasets_refuse_streaming_options(data, fragment):
    with pytest.raises(DataError, match=fragment):
        load_dataset(DataConfig(**data))


def test_resized_crop_cannot_be_resident(imagenet_tree):
    with pytest.raises(DataError, match="set data.pipeline=stream"):
        load_dataset(DataConfig(name="imagenet", root=str(imagenet_tree), pipeline="resident"))


# ---------------------------------------------------------------- the command line on both layouts

SMALL = ["--config", str(REPO / "configs/quickstart.yml"), "train.epochs=2", "schedule.milestones=[1]",
         "method.rampup_epochs=1", "train.batch_size=6", "device=cpu", "train.channels_last=false"]


def test_one_epoch_on_each_layout_trains_and_reports(tmp_path, imagenet_tree):
    tiny = make_tiny_tree(tmp_path / "tiny")
    runs = {"imagenet": ["data.name=imagenet", f"data.root={imagenet_tree}", "data.image_size=32", "data.workers=1"],
            "tiny": ["data.name=tinyimagenet", f"data.root={tiny}", "data.pipeline=stream", "data.workers=2"]}
    for name, args in runs.items():
        assert main([*SMALL, *args, "train.epochs=1", "schedule.milestones=[]", f"output.root={tmp_path / 'runs'}",
                     "--save_dir", name]) == 0
        record = records(tmp_path / "runs" / name)[-1]
        assert record["val"]["count"] == 9 and 0 <= record["val"]["top1"]["peer1"] <= 100
        assert record["train"]["img_per_s"] > 0
    assert "stream pipeline" in (tmp_path / "runs" / "imagenet" / "log.txt").read_text()


def test_unreadable_image_mid_epoch_is_one_line_and_keeps_the_progress(tmp_path, capsys):
    root = make_imagenet_tree(tmp_path / "in", sizes=(40, 60))
    data = load_dataset(DataConfig(name="imagenet", root=str(root)))
    bad_index = int(epoch_order(18, 0, 0)[0][13])  # in batch 3 of epoch 1 (batch 6)
    bad = data.train.path(bad_index)
    with open(bad, "r+b") as fh:
        fh.truncate(40)
    run = [*SMALL, "data.name=imagenet", f"data.root={root}", "data.image_size=32", "data.workers=2",
           f"output.root={tmp_path}", "--save_dir", "run"]
    assert main(run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"cannot read image '{bad}'" in err and "continue from batch 3 of epoch 1" in err
    assert checkpoint_file.load(tmp_path / "run" / "last.pt")["batch_in_epoch"] == 2
    Image.fromarray(synthetic_image(50, 50, 1)).save(bad, format="JPEG")  # repaired: the run continues
    assert main(run) == 0 and [r["epoch"] for r in records(tmp_path / "run")] == [1, 2]


# ---------------------------------------------------------------- kill and resume, torchrun

def kill_run(tmp_path, tree, name):
    args = [*SMALL, "data.name=imagenet", f"data.root={tree}", "data.image_size=32", "data.workers=2",
            "train.batch_size=4", "checkpoint.every_n_steps=1", "train.log_every=1", "train.threads=1",
            f"output.root={tmp_path}", "--save_dir", name]
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(REPO),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.ci  # slow and needed: .ci/run runs it (pyproject's markers)
def test_sigkill_mid_epoch_then_rerun_is_bitwise_equal_with_workers(tmp_path, imagenet_tree):
    straight = kill_run(tmp_path, imagenet_tree, "straight")  # alongside the killed run: 2 cores, 1 thread each
    proc = kill_run(tmp_path, imagenet_tree, "killed")
    steps = 0
    for line in proc.stdout:
        steps += " step " in line
        if steps == 3:  # in epoch 1 (5 batches per epoch), with checkpoints after every step
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-2000:]
    assert checkpoint_file.load(tmp_path / "killed" / "last.pt")["batch_in_epoch"] >= 1
    proc = kill_run(tmp_path, imagenet_tree, "killed")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from" in out, out[-2000:]
    a = checkpoint_file.load(tmp_path / "straight" / "last.pt")["method_state"]
    b = checkpoint_file.load(tmp_path / "killed" / "last.pt")["method_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val"] for r in records(tmp_path / "killed")] == [r["val"] for r in records(tmp_path / "straight")]


def test_two_process_gloo_counts_every_streamed_val_image_once(tmp_path):
    tree = make_imagenet_tree(tmp_path / "in", val_per_class=5, sizes=(40, 70))  # 15 val images: odd
    dump = tmp_path / "dump"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests/helpers/ddp_worker.py"), *SMALL, "train.epochs=1", "schedule.milestones=[]",
           "data.name=imagenet", f"data.root={tree}", "data.image_size=32", "data.workers=1",
           f"output.root={tmp_path}", "--save_dir", "ddp"]
    env = {**os.environ, "OKD_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = records(tmp_path / "ddp")[-1]
    assert record["val"]["count"] == 15
    assert record["distributed"] == {"world_size": 2, "ranks_in_sync": True}
    # the summed hits are those of one process evaluating the same weights on all 15 images
    from okd.build import build_run_method
    from okd.config import load_config
    from okd.evaluate import test_set

    cfg = load_config(str(tmp_path / "ddp" / "config.yaml"), ["device=cpu"])
    data = load_dataset(cfg.data)
    method = build_run_method(cfg, data.num_classes, torch.device("cpu"), image_size=data.image_size)
    method.load_state_dict(torch.load(dump / "rank0.pt"))
    single = test_set(data, cfg, torch.device("cpu")).evaluate(method)
    assert single["count"] == 15 and single["top1"] == pytest.approx(record["val"]["top1"], abs=1e-9)
    # the diversity and calibration sums too: the ranks' sums are the one process's
    ours, theirs = record["val"]["diagnostics"], single["diagnostics"]
    assert set(ours["groups"]) == set(theirs["groups"]) != set()
    for group in ours["groups"]:
        for key in ("disagreement", "kl", "ensemble_top1", "ensemble_gain"):
            assert ours["groups"][group][key] == pytest.approx(theirs["groups"][group][key], rel=1e-5, abs=1e-9)
    for model in ours["calibration"]:
        assert ours["calibration"][model] == pytest.approx(theirs["calibration"][model], rel=1e-5, abs=1e-9)
