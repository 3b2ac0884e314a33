"""Datasets held as whole uint8 tensors: CIFAR pickles, ImageFolder trees, embedded digits.

Every loader returns a ``Dataset`` whose splits are ``uint8`` tensors of shape
(N, 3, 32, 32) plus int64 labels, so augmentation can run batched on the
training device (``okd.data.augment``). Nothing is decoded per epoch.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..registry import Registry

DATASETS = Registry("dataset", hint=f"a new dataset is a file in {Path(__file__).resolve().parent}/ whose loader "
                                    f"function has @DATASETS.register('{{name}}')")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x 32 x 32
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_root(root: Optional[str]) -> Path:
    return Path(root or os.environ.get("OKD_DATA") or "data").expanduser()


def channel_stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# ---------------------------------------------------------------- CIFAR (python pickles)

CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"CIFAR file '{path}' is missing; re-extract the dataset archive there") from None
    except Exception as exc:  # truncated or foreign file
        raise DataError(f"CIFAR file '{path}' is corrupt ({type(exc).__name__}); delete it and re-extract the archive") from None


def _find_cifar_dir(root: Path, folder: str, meta_file: str) -> Optional[Path]:
    """``root/<folder>`` as torchvision extracts it, or ``root`` itself if it is that folder."""
    for candidate in (root / folder, root):
        if (candidate / meta_file).is_file():
            return candidate
    return None


def load_cifar(name: str, root: Path, download: bool) -> Dataset:
    folder, train_files, test_files, label_key, meta_file, names_key = CIFAR_LAYOUT[name]
    base = _find_cifar_dir(root, folder, meta_file)
    if base is None and download:
        try:
            import torchvision

            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            cls(str(root), train=True, download=True)
        except Exception as exc:
            raise DataError(
                f"{name} not found under '{root}' and the download failed ({type(exc).__name__}); "
                f"place the python-version archive's '{folder}/' folder in '{root}'"
            ) from None
        base = _find_cifar_dir(root, folder, meta_file)
    if base is None:
        raise DataError(
            f"{name} not found: searched '{root / folder}'; extract the python-version archive "
            f"({folder}) into '{root}' or set data.root / $OKD_DATA / --data-root (or data.download=true)"
        )

    def read(files):
        images, labels = [], []
        for f in files:
            entry = _read_pickle(base / f)
            try:
                images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[label_key], dtype=np.int64))
            except (KeyError, ValueError) as exc:
                raise DataError(f"CIFAR file '{base / f}' is not a {name} batch ({exc}); re-extract the archive") from None
        return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    classes = list(_read_pickle(base / meta_file)[names_key])
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return Dataset(name, read(train_files), read(test_files), classes, mean, std)


@DATASETS.register("cifar10")
def cifar10(cfg) -> Dataset:
    return load_cifar("cifar10", default_root(cfg.root), cfg.download)


@DATASETS.register("cifar100")
def cifar100(cfg) -> Dataset:
    return load_cifar("cifar100", default_root(cfg.root), cfg.download)


# ---------------------------------------------------------------- ImageFolder (decoded once, cached)

def _list_tree(split_dir: Path) -> Tuple[List[str], List[Tuple[Path, int]]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"ImageFolder split '{split_dir}' has no class folders; expected '{split_dir}/<class>/<image>'")
    items = []
    for index, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"ImageFolder class folder '{split_dir / cls}' holds no images; remove it or add images")
        items += [(p, index) for p in files]
    return classes, items


def _decode(items, size: int) -> Split:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    images = np.empty((len(items), size, size, 3), dtype=np.uint8)

    def decode_one(i: int) -> None:
        path = items[i][0]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images[i] = np.asarray(im)
        except Exception as exc:
            raise DataError(f"cannot decode image '{path}' ({type(exc).__name__}); remove or replace it") from None

    # PIL releases the GIL while decoding, so threads use every core
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(decode_one, range(len(items)), chunksize=256):
            pass
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def _cache_path(root: Path, cache_dir: Optional[str], key: str) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser() / f"imagefolder-{key}.pt"
    beside = root / ".okd_cache"
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / ".write_test"
        probe.touch()
        probe.unlink()
        return beside / f"imagefolder-{key}.pt"
    except OSError:  # read-only data (e.g. a shared mount): cache in the user's home
        return Path.home() / ".cache" / "okd" / f"imagefolder-{key}.pt"


@DATASETS.register("imagefolder")
def imagefolder(cfg, size: int = 32) -> Dataset:
    root = default_root(cfg.root)
    train_dir, test_dir = root / "train", root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"ImageFolder split '{d}' not found; expected '{root}/train/<class>/*' and '{root}/test/<class>/*'")
    train_classes, train_items = _list_tree(train_dir)
    test_classes, test_items = _list_tree(test_dir)
    if train_classes != test_classes:
        only = sorted(set(train_classes) ^ set(test_classes))
        raise DataError(f"ImageFolder train and test class folders differ (e.g. {only[:3]}) under '{root}'; make them match")
    # The key changes whenever a file is added, removed, renamed or rewritten.
    digest = hashlib.sha1(f"{root.resolve()}|{size}".encode())
    for path, label in train_items + test_items:
        st = path.stat()
        digest.update(f"{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_path(root, cfg.cache_dir, digest.hexdigest()[:16])
    blob = None
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if not {"train", "test", "mean", "std"} <= set(blob):
                raise KeyError("incomplete cache")
        except Exception:
            blob = None
            cache.unlink(missing_ok=True)  # a broken or older cache is only a cache: rebuild it
    if blob is None:
        train, test = _decode(train_items, size), _decode(test_items, size)
        mean, std = channel_stats(train.images)  # measured once, stored with the pixels
        blob = {"train": (train.images, train.labels), "test": (test.images, test.labels),
                "mean": mean, "std": std}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    return Dataset("imagefolder", Split(*blob["train"]), Split(*blob["test"]), train_classes,
                   tuple(blob["mean"]), tuple(blob["std"]))


# ---------------------------------------------------------------- embedded digits (no network)

@DATASETS.register("digits")
def digits(cfg, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 real scans) as 32x32 RGB.

    Split: a fixed stratified split (20% of each class to test, chosen by a
    RandomState(0) permutation), independent of the run's seed.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    big = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rng = np.random.RandomState(0)
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(bunch.target == c)
        test_idx += list(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    train = Split(images[~test_mask], labels[~test_mask])
    test = Split(images[test_mask], labels[test_mask])
    mean, std = channel_stats(train.images)
    return Dataset("digits", train, test, [str(c) for c in range(10)], mean, std)


def subset(split: Split, size: Optional[int]) -> Split:
    """A fixed random subset (RandomState(0), independent of the run's seed), in its original order."""
    if size is None or size >= len(split):
        return split
    keep = np.sort(np.random.RandomState(0).permutation(len(split))[:size])
    keep = torch.from_numpy(keep)
    return Split(split.images[keep], split.labels[keep])


def load_dataset(cfg) -> Dataset:
    dataset = DATASETS.get(cfg.name)(cfg)
    dataset.train = subset(dataset.train, cfg.train_subset)
    dataset.test = subset(dataset.test, cfg.test_subset)
    if cfg.mean is not None:
        dataset.mean = tuple(cfg.mean)
    if cfg.std is not None:
        dataset.std = tuple(cfg.std)
    return dataset
