"""The streaming path: image files decoded and augmented in DataLoader workers, batch by batch.

For datasets that do not fit in memory (ImageNet) or whose recipe needs the original
images (RandomResizedCrop). Data flows one way:

    EpochJobs (main process: the epoch's order (okd.data.sampling), this rank's share of global batch b)
      -> TrainViews (a worker: decode each image once, make every view, uint8)
      -> pinned memory -> a side CUDA stream copies the next batch while this one trains
      -> normalise and memory format on the device -> ``Batch``

Determinism: the epoch's order derives from (seed, epoch) exactly as on the resident
path, and every view of image i from a generator seeded with (seed, epoch, i). So
neither the number of workers nor the rank that makes an image changes a pixel, and
a run resumed at batch b continues with the batches it would have had. Under torchrun,
rank r takes its slice of every global batch, so the ranks together see the images of
one process; evaluation gives each rank one contiguous shard of the test files.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..distributed import DistInfo
from ..errors import DataError
from .augment import Normalizer, derive_seed
from .images import (
    UnreadableImage,
    eval_view,
    pad_crop_flip,
    read_image,
    resized_crop_flip,
)
from .resident import Batch
from .sampling import Sampling
from .view_augment import apply, draw, needs_more
from .splits import FileSplit

VIEW_SEED_TAG = 0xA116  # keeps the per-image seeds apart from the other (seed, epoch, ...) streams


def view_seed(seed: int, epoch: int, index: int) -> int:
    return derive_seed(seed, epoch, VIEW_SEED_TAG, index)


class TrainViews(TorchDataset):
    """Worker side: a job (epoch, batch index, image indices) -> (batch index, m x n x 3 x S x S uint8, labels)."""

    def __init__(self, split: FileSplit, num_views: int, size: int, augment: str, pad: int, flip: bool,
                 crop_scale: Sequence[float], seed: int, recipes=None):
        self.split, self.num_views, self.size, self.augment = split, num_views, size, augment
        self.pad, self.flip, self.crop_scale, self.seed = pad, flip, tuple(crop_scale), seed
        self.recipes = recipes  # data.views, parsed; None: every view the crop and flip

    def __len__(self) -> int:
        return len(self.split)

    def view(self, image: torch.Tensor, gen: torch.Generator, v: int = 0) -> torch.Tensor:
        ops = self.recipes[v] if self.recipes else ("flip",)
        flip = self.flip and "flip" in ops
        if self.augment == "resized_crop":
            out = resized_crop_flip(image, self.size, self.crop_scale, flip, gen)
        else:
            out = pad_crop_flip(image, self.size, self.pad, flip, gen)
        if needs_more(ops):  # the view's other operations, drawn from the image's generator next
            out = apply(out[None], ops, draw(ops, 1, (self.size, self.size), gen))[0]
        return out

    def __getitem__(self, job):
        epoch, index, images, keys = job
        views = torch.empty((self.num_views, len(images), 3, self.size, self.size), dtype=torch.uint8)
        for j, (i, key) in enumerate(zip(images.tolist(), keys.tolist())):
            try:
                image = read_image(self.split.path(i))
            except UnreadableImage as exc:
                return exc  # raised in the main process, as one line
            gen = torch.Generator().manual_seed(view_seed(self.seed, epoch, key))
            for v in range(self.num_views):
                views[v, j] = self.view(image, gen, v)
        return index, views, self.split.labels[torch.from_numpy(images)]


class EpochJobs(torch.utils.data.Sampler):
    """Main-process side: this rank's jobs of one epoch from global batch ``start`` on.

    A job's seed keys name each image's view generator: the image index for the shuffle (each image once an
    epoch), ``num_images`` + the position where a sampler may draw an image twice (each draw its own views)."""

    def __init__(self, sampling: Sampling, batch_size: int, seed: int, dist: DistInfo):
        self.sampling, self.batch_size, self.seed, self.dist = sampling, batch_size, seed, dist
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, len(self.sampling) - self.start)

    def __iter__(self):
        order = self.sampling.order(self.seed, self.epoch)[0].numpy()
        by_position = self.sampling.sampler != "shuffle"
        for b in range(self.start, len(self.sampling)):
            positions = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.sampling.length))
            if len(positions) < self.dist.world_size:
                continue  # too few images left to give every rank one (as on the resident path)
            share = np.array_split(positions, self.dist.world_size)[self.dist.rank]
            images = order[share]
            yield self.epoch, b, images, (share + self.sampling.num_images) if by_position else images


def loader(dataset: TorchDataset, jobs, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=None, sampler=jobs, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def on_device(items: Iterator, device: torch.device) -> Iterator[Tuple]:
    """(index, tensors...) items moved to ``device``; on CUDA the copy of the next item overlaps this one's use.

    An ``UnreadableImage`` from a worker becomes a one-line ``DataError`` once the items before it are out.
    """
    if device.type != "cuda":
        for item in items:
            if isinstance(item, UnreadableImage):
                raise DataError(str(item))
            yield (item[0],) + tuple(t.to(device) for t in item[1:])
        return
    copy_stream = torch.cuda.Stream(device)
    pending = None
    for item in items:
        if isinstance(item, UnreadableImage):
            if pending is not None:
                yield _ready(pending, device)
            raise DataError(str(item))
        with torch.cuda.stream(copy_stream):
            moved = (item[0],) + tuple(t.to(device, non_blocking=True) for t in item[1:])
            done = torch.cuda.Event()
            done.record(copy_stream)
        if pending is not None:
            yield _ready(pending, device)
        pending = (moved, done)
    if pending is not None:
        yield _ready(pending, device)


def _ready(pending, device: torch.device) -> Tuple:
    moved, done = pending
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    for t in moved[1:]:
        t.record_stream(current)  # allocated on the copy stream, used on this one
    return moved


class StreamBatches:
    """The training batches of the streaming path; the same interface as the resident ``BatchStream``."""

    def __init__(self, split: FileSplit, normalize: Normalizer, num_views: int, batch_size: int, size: int,
                 augment: str, pad: int, flip: bool, crop_scale: Sequence[float], seed: int, device: torch.device,
                 workers: int, channels_last: bool = False, dist: DistInfo = DistInfo(), sampler: str = "shuffle",
                 m_per_class: int = 2, recipes=None):
        self.normalize, self.num_views, self.batch_size, self.device = normalize, num_views, batch_size, device
        self.num_images = len(split)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampling = Sampling(split.labels, batch_size, sampler, m_per_class, dist.world_size)
        self.jobs = EpochJobs(self.sampling, batch_size, seed, dist)
        views = TrainViews(split, num_views, size, augment, pad, flip, crop_scale, seed, recipes)
        self.loader = loader(views, self.jobs, workers, device)

    def __len__(self) -> int:
        """Global batches per epoch; the last partial batch is kept."""
        return len(self.sampling)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.jobs.set_epoch(epoch, start)
        for index, views, labels in on_device(iter(self.loader), self.device):
            yield Batch(index, [self.normalize(views[v]).contiguous(memory_format=self.memory_format)
                                for v in range(self.num_views)], labels)


class EvalImages(TorchDataset):
    """Worker side: a job (lo, hi) -> (lo, n x 3 x S x S uint8 test views, labels)."""

    def __init__(self, split: FileSplit, size: int, augment: str):
        self.split, self.size, self.augment = split, size, augment

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, job):
        lo, hi = job
        images = torch.empty((hi - lo, 3, self.size, self.size), dtype=torch.uint8)
        for j, i in enumerate(range(lo, hi)):
            try:
                images[j] = eval_view(read_image(self.split.path(i)), self.augment, self.size)
            except UnreadableImage as exc:
                return exc
        return lo, images, self.split.labels[lo:hi]


def eval_jobs(start: int, stop: int, batch_size: int) -> List[Tuple[int, int]]:
    return [(lo, min(lo + batch_size, stop)) for lo in range(start, stop, batch_size)]


def workers(data_cfg, dist: DistInfo) -> int:
    """data.workers, or this process's share of the cores (every decode process uses one thread)."""
    if data_cfg.workers is not None:
        return data_cfg.workers
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    return max(1, (os.cpu_count() or 1) // local_procs)
