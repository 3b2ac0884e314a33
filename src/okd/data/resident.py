"""The training batches of an epoch, made on the device from the resident uint8 split.

Everything random about an epoch (order, crop offsets, flips of every view)
is drawn from (seed, epoch) on the CPU and moved to the device once; batch b
of the epoch is then a gather, crop/flip per view, normalisation and memory
format, all on the device. Under torchrun each rank takes its slice of every
global batch, so the ranks together see exactly the images of one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from ..distributed import DistInfo
from .augment import EpochDraws, Normalizer, crop_flip
from .sampling import Sampling
from .splits import Split


@dataclass
class Batch:
    index: int  # position of this global batch in its epoch, 0-based
    views: List[torch.Tensor]  # this rank's share, one normalised augmented view per method view
    labels: torch.Tensor


class BatchStream:
    def __init__(self, split: Split, normalize: Normalizer, num_views: int, batch_size: int, pad: int, flip: bool,
                 seed: int, device: torch.device, channels_last: bool = False, dist: DistInfo = DistInfo(),
                 sampler: str = "shuffle", m_per_class: int = 2):
        self.sampling = Sampling(split.labels, batch_size, sampler, m_per_class, dist.world_size)
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.normalize, self.num_views, self.batch_size = normalize, num_views, batch_size
        self.pad, self.flip, self.seed, self.device, self.dist = pad, flip, seed, device, dist
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        """Global batches per epoch; the last partial batch is kept."""
        return len(self.sampling)

    @property
    def num_images(self) -> int:
        return int(self.labels.numel())

    def draws(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's order, crop offsets and flips, on the device."""
        d = EpochDraws(self.num_images, self.num_views, self.pad, self.flip, self.seed, epoch, self.sampling)
        return tuple(t.to(self.device) for t in (d.order, d.offsets, d.flips))

    def batch(self, b: int, draws) -> Optional[Batch]:
        """This rank's share of global batch ``b``; None when too few images are left to give every rank one."""
        order, offsets, flips = draws
        pos = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.sampling.length),
                           device=self.device)
        if pos.numel() < self.dist.world_size:
            return None
        pos = pos.tensor_split(self.dist.world_size)[self.dist.rank]
        idx = order[pos]
        images = self.images[idx]
        views = [self.normalize(crop_flip(images, offsets[v, pos], flips[v, pos], self.pad)).contiguous(
            memory_format=self.memory_format) for v in range(self.num_views)]
        return Batch(b, views, self.labels[idx])

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from global batch ``start`` on (a run resumed mid-epoch)."""
        draws = self.draws(epoch)
        for b in range(start, len(self)):
            batch = self.batch(b, draws)
            if batch is not None:
                yield batch
