"""What a dataset holds: resident splits (``Split``: uint8 pixels and labels), image-file splits
(``FileSplit``), the ``Dataset`` that pairs them with its classes and normalisation, and the
operations on splits: a fixed ``subset`` and the channel statistics."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch


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


def subset(split, size: Optional[int]):
    """A fixed random subset (RandomState(0), independent of the run's seed), in its original order."""
    if size is None or size >= len(split):
        return split
    keep = np.sort(np.random.RandomState(0).permutation(len(split))[:size])
    if isinstance(split, FileSplit):
        return FileSplit(split.root, split.files[keep], split.labels[torch.from_numpy(keep)])
    keep = torch.from_numpy(keep)
    return Split(split.images[keep], split.labels[keep])


def channel_stats(images: torch.Tensor) -> Tuple[tuple, tuple]:
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
