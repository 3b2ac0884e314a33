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

import os
from pathlib import Path
from typing import Optional

from ..errors import DataError
from ..registry import Registry
from .decode_cache import decode_resident, sample_stats
from .splits import Dataset, FileSplit, Split, subset

DATASETS = Registry("dataset", hint=f"a new dataset is a file in {Path(__file__).resolve().parent}/ whose loader "
                                    f"function has @DATASETS.register('{{name}}', train_images=N, num_classes=C)")

PIPELINES = ("auto", "resident", "stream")
RESIDENT_LIMIT_BYTES = 4 << 30  # decoded train + test at most this: resident (Tiny-ImageNet: 1.4 GB)


def default_root(root: Optional[str]) -> Path:
    return Path(root or os.environ.get("OKD_DATA") or "data").expanduser()


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
