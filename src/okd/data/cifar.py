"""CIFAR-10 and CIFAR-100 from the python-version pickles (``data.download=true`` fetches them)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from .datasets import DATASETS, default_root
from .splits import Dataset, Split

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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
