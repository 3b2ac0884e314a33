"""Dataset loaders: embedded digits, ImageFolder with cache, CIFAR pickles, and their errors."""
import pickle

import numpy as np
import pytest
import torch

from okd.config import DataConfig
from okd.data import load_dataset
from okd.errors import DataError


def test_digits_embedded_split():
    d = load_dataset(DataConfig(name="digits"))
    assert len(d.train) + len(d.test) == 1797
    assert d.train.images.shape[1:] == (3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.num_classes == 10
    # stratified: every class has ~20% of its images in test
    counts_test = torch.bincount(d.test.labels, minlength=10)
    counts_all = counts_test + torch.bincount(d.train.labels, minlength=10)
    assert torch.all((counts_test.float() / counts_all.float() - 0.2).abs() < 0.01)
    # fixed: independent of anything but the data
    again = load_dataset(DataConfig(name="digits"))
    assert torch.equal(again.test.images, d.test.images)
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 2])  # grey replicated to RGB
    assert d.train.images.max() == 255 and d.train.images.min() == 0


def test_subset_is_fixed_and_sized():
    a = load_dataset(DataConfig(name="digits", train_subset=100, test_subset=50))
    b = load_dataset(DataConfig(name="digits", train_subset=100, test_subset=50))
    assert len(a.train) == 100 and len(a.test) == 50
    assert torch.equal(a.train.labels, b.train.labels)


def make_tree(root, classes=("cat", "dog"), per_class=3, size=32, test_classes=None):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.randint(0, 256, size=(size, size, 3)).astype(np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i}.png")


def test_imagefolder_loads_and_caches(tmp_path, monkeypatch):
    make_tree(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "tree"), cache_dir=str(tmp_path / "cache"))
    d = load_dataset(cfg)
    assert d.classes == ["cat", "dog"] and len(d.train) == 6 and len(d.test) == 6
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "tree" / "train" / "cat" / "0.png"))
    assert np.array_equal(d.train.images[0].permute(1, 2, 0).numpy(), first)
    assert list((tmp_path / "cache").iterdir())
    import okd.data.decode_cache as ds

    monkeypatch.setattr(ds, "_decode", lambda *a: pytest.fail("decoded again instead of using the cache"))
    again = load_dataset(cfg)
    assert torch.equal(again.train.images, d.train.images)


def test_imagefolder_resizes_other_sizes(tmp_path):
    make_tree(tmp_path / "tree", size=40)
    d = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "tree"), cache_dir=str(tmp_path / "c")))
    assert d.train.images.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("setup,fragment", [
    ("missing", "imagefolder not found"),
    ("empty_class", "holds no images"),
    ("mismatch", "differ: 1 only in train"),
])
def test_imagefolder_errors(tmp_path, setup, fragment):
    root = tmp_path / "tree"
    if setup == "empty_class":
        make_tree(root)
        (root / "train" / "bird").mkdir()
        (root / "test" / "bird").mkdir()
    elif setup == "mismatch":
        make_tree(root, test_classes=("cat", "cow"))
    with pytest.raises(DataError, match=fragment):
        load_dataset(DataConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "c")))


def write_fake_cifar10(root, n=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.randint(0, 256, size=(n, 3072)).astype(np.uint8), "labels": list(range(n))}
        with open(base / name, "wb") as fh:
            pickle.dump(entry, fh)
    with open(base / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return base


def test_cifar_pickle_layout(tmp_path):
    base = write_fake_cifar10(tmp_path)
    d = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert len(d.train) == 20 and len(d.test) == 4 and d.num_classes == 10
    with open(base / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh)["data"][0]
    assert np.array_equal(d.train.images[0].numpy().reshape(-1), raw)  # CHW row-major, as CIFAR stores it
    assert d.mean == (0.4914, 0.4822, 0.4465)


def test_cifar_missing_names_path(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path / "nowhere")))
    assert "cifar-100-python" in str(info.value) and "nowhere" in str(info.value)


def test_cifar_corrupt_pickle(tmp_path):
    base = write_fake_cifar10(tmp_path)
    (base / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3' is corrupt"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_okd_data_env(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    monkeypatch.setenv("OKD_DATA", str(tmp_path))
    assert len(load_dataset(DataConfig(name="cifar10")).test) == 4
