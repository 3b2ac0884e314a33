"""Image files decoded once into a resident split, cached on disk beside the data (or in ``~/.cache/okd``)."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..errors import DataError
from .images import UnreadableImage, read_image, resize_square
from .splits import Dataset, FileSplit, Split, channel_stats, subset

STATS_SAMPLE = 1000  # training images whose channel statistics normalise a streamed dataset without constants


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
