"""Datasets: what the splits hold and how they reach the training loop.

A split is either resident (``Split``: one uint8 N x 3 x S x S tensor plus labels,
augmented in batches on the training device by ``okd.data.augment``) or a list of
image files (``FileSplit``), which ``load_dataset`` either decodes once into a resident
split (cached on disk) or leaves to the streaming path (``okd.data.file_stream``), by
``data.pipeline``: ``auto`` keeps a dataset resident when its decoded splits take at
most ``RESIDENT_LIMIT_BYTES`` and its recipe is ``crop_flip``, and streams it otherwise.
CIFAR and the embedded digits are resident by nature; the image-folder layouts
(``okd.data.folders``) can go either way.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..registry import Registry
from .images import UnreadableImage, read_image, resize_square

DATASETS = Registry("dataset", hint=f"a new dataset is a file in {Path(__file__).resolve().parent}/ whose loader "
                                    f"function has @DATASETS.register('{{name}}')")

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
PIPELINES = ("auto", "resident", "stream")
RESIDENT_LIMIT_BYTES = 4 << 30  # decoded train + test at most this: resident (Tiny-ImageNet: 1.4 GB)
STATS_SAMPLE = 1000  # training images whose channel statistics normalise a streamed dataset without constants


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x S x S
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class FileSplit:
    """Image files, decoded when used. Paths are one numpy bytes array relative to ``root``, not a
    list of Python strings, so DataLoader workers forked from the main process share its pages."""
    root: str
    files: np.ndarray  # dtype S: os.fsencode(path relative to root)
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.numel())

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    @classmethod
    def build(cls, root: Union[str, Path], items: Sequence[Tuple[str, int]]) -> "FileSplit":
        files = np.array([os.fsencode(rel) for rel, _ in items], dtype=np.bytes_)
        return cls(str(root), files, torch.tensor([label for _, label in items], dtype=torch.int64))


@dataclass
class Dataset:
    name: str
    train: Union[Split, FileSplit]
    test: Union[Split, FileSplit]
    classes: List[str]
    mean: Optional[Tuple[float, float, float]]  # None: measured on the training images
    std: Optional[Tuple[float, float, float]]
    image_size: int = 32  # side of the square views the model sees
    augment: str = "crop_flip"  # the training recipe, see okd.data.images
    pipeline: str = "resident"  # resident | stream, decided by load_dataset

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
    return Dataset(name, read(train_files), read(test_files), classes, mean, std, image_size=32)


@DATASETS.register("cifar10", train_images=50_000, num_classes=10)
def cifar10(cfg) -> Dataset:
    return load_cifar("cifar10", default_root(cfg.root), cfg.download)


@DATASETS.register("cifar100", train_images=50_000, num_classes=100)
def cifar100(cfg) -> Dataset:
    return load_cifar("cifar100", default_root(cfg.root), cfg.download)


# ---------------------------------------------------------------- embedded digits (no network)

@DATASETS.register("digits", train_images=1_438, num_classes=10)
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


def subset(split, size: Optional[int]):
    """A fixed random subset (RandomState(0), independent of the run's seed), in its original order."""
    if size is None or size >= len(split):
        return split
    keep = np.sort(np.random.RandomState(0).permutation(len(split))[:size])
    if isinstance(split, FileSplit):
        return FileSplit(split.root, split.files[keep], split.labels[torch.from_numpy(keep)])
    keep = torch.from_numpy(keep)
    return Split(split.images[keep], split.labels[keep])


def load_dataset(cfg) -> Dataset:
    """The dataset of ``cfg`` (a ``DataConfig``), with its size, recipe and pipeline decided."""
    dataset = DATASETS.get(cfg.name)(cfg)
    if cfg.augment is not None:
        dataset.augment = cfg.augment
    if cfg.image_size is not None:
        if isinstance(dataset.train, Split) and cfg.image_size != dataset.image_size:
            raise DataError(f"{dataset.name} images are {dataset.image_size}x{dataset.image_size}; set "
                            f"data.image_size=null (or {dataset.image_size}): only image-file datasets are resized")
        dataset.image_size = cfg.image_size
    dataset.train = subset(dataset.train, cfg.train_subset)
    dataset.test = subset(dataset.test, cfg.test_subset)
    dataset.pipeline = choose_pipeline(cfg.pipeline, dataset)
    if dataset.pipeline == "resident" and isinstance(dataset.train, FileSplit):
        decode_resident(dataset, cfg.cache_dir)
    if cfg.mean is not None:
        dataset.mean = tuple(cfg.mean)
    if cfg.std is not None:
        dataset.std = tuple(cfg.std)
    if dataset.mean is None or dataset.std is None:
        mean, std = sample_stats(dataset.train, dataset.image_size)
        dataset.mean, dataset.std = dataset.mean or mean, dataset.std or std
    return dataset


def choose_pipeline(asked: str, dataset: Dataset) -> str:
    files = isinstance(dataset.train, FileSplit)
    if not files:
        if asked == "stream":
            raise DataError(f"data.pipeline=stream needs an image-file dataset (imagefolder, tinyimagenet, "
                            f"imagenet); {dataset.name} is held in memory: set data.pipeline=auto")
        if dataset.augment != "crop_flip":
            raise DataError(f"data.augment={dataset.augment} needs an image-file dataset on the streaming "
                            f"path; {dataset.name} is resident: set data.augment=null")
        return "resident"
    if asked == "resident" and dataset.augment != "crop_flip":
        raise DataError(f"data.augment={dataset.augment} crops the original images, which only the streaming "
                        f"path keeps: set data.pipeline=stream (or auto)")
    if asked != "auto":
        return asked
    decoded = (len(dataset.train) + len(dataset.test)) * 3 * dataset.image_size ** 2
    return "resident" if dataset.augment == "crop_flip" and decoded <= RESIDENT_LIMIT_BYTES else "stream"


# ---------------------------------------------------------------- image files decoded once (resident, cached)

def _decode(split: FileSplit, size: int) -> Split:
    images = np.empty((len(split), 3, size, size), dtype=np.uint8)

    def decode_one(i: int) -> None:
        try:
            images[i] = resize_square(read_image(split.path(i)), size).numpy()
        except UnreadableImage as exc:
            raise DataError(str(exc)) from None

    # torchvision's decoders release the GIL, so threads use every core
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(decode_one, range(len(split)), chunksize=256):
            pass
    return Split(torch.from_numpy(images), split.labels.clone())


def _cache_path(root: Path, cache_dir: Optional[str], name: str) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser() / f"{name}.pt"
    beside = root / ".okd_cache"
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / ".write_test"
        probe.touch()
        probe.unlink()
        return beside / f"{name}.pt"
    except OSError:  # read-only data (e.g. a shared mount): cache in the user's home
        return Path.home() / ".cache" / "okd" / f"{name}.pt"


def cache_key(dataset: Dataset) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten, or the size changes."""
    digest = hashlib.sha1(f"v2|{dataset.name}|{dataset.image_size}|{dataset.mean}|{dataset.std}".encode())
    for split in (dataset.train, dataset.test):
        digest.update(f"{Path(split.root).resolve()}\n".encode())
        for i in range(len(split)):
            st = os.stat(split.path(i))
            digest.update(split.files[i] + f"|{int(split.labels[i])}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def decode_resident(dataset: Dataset, cache_dir: Optional[str]) -> None:
    """Replace the file splits by their pixels at ``image_size``, decoded once and cached on disk."""
    try:
        key = cache_key(dataset)
    except OSError as exc:
        raise DataError(f"cannot read '{exc.filename}' ({exc.strerror}); check the dataset folder") from None
    cache = _cache_path(Path(dataset.train.root).parent, cache_dir, f"{dataset.name}-{key}")
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
        train, test = _decode(dataset.train, dataset.image_size), _decode(dataset.test, dataset.image_size)
        mean, std = channel_stats(train.images) if dataset.mean is None else (dataset.mean, dataset.std)
        blob = {"train": (train.images, train.labels), "test": (test.images, test.labels), "mean": mean, "std": std}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(blob, tmp)
        os.replace(tmp, cache)
    dataset.train, dataset.test = Split(*blob["train"]), Split(*blob["test"])
    dataset.mean, dataset.std = tuple(blob["mean"]), tuple(blob["std"])


def sample_stats(split, size: int) -> Tuple[tuple, tuple]:
    """Channel mean/std of a fixed sample of up to STATS_SAMPLE training images at ``size``."""
    if isinstance(split, Split):
        return channel_stats(split.images)
    return channel_stats(_decode(subset(split, STATS_SAMPLE), size).images)
