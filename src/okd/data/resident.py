"""The training batches of an epoch, made on the device from the resident uint8 split.

Everything random about an epoch (order, crop offsets, flips of every view)
is drawn from (seed, epoch) on the CPU and moved to the device once; batch b
of the epoch is then a gather, crop/flip per view, normalisation and memory
format, all on the device. Under torchrun each rank takes its slice of every
global batch, so the ranks together see exactly the images of one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

from ..distributed import DistInfo
from .augment import EpochDraws, Normalizer, crop_flip
from .sampling import Sampling
from .view_augment import apply, needs_more
from .splits import Split


@dataclass
class Batch:
    index: int  # position of this global batch in its epoch, 0-based
    views: List[torch.Tensor]  # this rank's share, one normalised augmented view per method view
    labels: torch.Tensor


class BatchStream:
    def __init__(self, split: Split, normalize: Normalizer, num_views: int, batch_size: int, pad: int, flip: bool,
                 seed: int, device: torch.device, channels_last: bool = False, dist: DistInfo = DistInfo(),
                 sampler: str = "shuffle", m_per_class: int = 2, recipes=None):
        self.sampling = Sampling(split.labels, batch_size, sampler, m_per_class, dist.world_size)
        # data.views, parsed (okd.data.view_augment): None keeps every view crop + flip
        self.recipes = recipes if recipes and any(needs_more(ops) or "flip" not in ops for ops in recipes) else None
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

    def draws(self, epoch: int):
        """The epoch's order, crop offsets and flips on the device, and each view's other parameters (on the
        CPU, where a batch's groups are found without a host sync)."""
        size = tuple(self.images.shape[-2:])
        d = EpochDraws(self.num_images, self.num_views, self.pad, self.flip, self.seed, epoch, self.sampling,
                       self.recipes, size)
        return tuple(t.to(self.device) for t in (d.order, d.offsets, d.flips)) + (d.params,)

    def batch(self, b: int, draws) -> Optional[Batch]:
        """This rank's share of global batch ``b``; None when too few images are left to give every rank one."""
        order, offsets, flips, params = draws
        # the positions on the device (no copy for the default views); on the CPU too where a recipe's groups
        # are found from its CPU draws
        where = torch.device("cpu") if self.recipes else self.device
        positions = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.sampling.length),
                                 device=where)
        if positions.numel() < self.dist.world_size:
            return None
        positions = positions.tensor_split(self.dist.world_size)[self.dist.rank]
        pos = positions.to(self.device)
        idx = order[pos]
        images = self.images[idx]
        views = []
        for v in range(self.num_views):
            view = crop_flip(images, offsets[v, pos], flips[v, pos], self.pad)
            if params[v] is not None:
                view = apply(view, self.recipes[v], params[v].select(positions))
            views.append(self.normalize(view).contiguous(memory_format=self.memory_format))
        return Batch(b, views, self.labels[idx])

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from global batch ``start`` on (a run resumed mid-epoch)."""
        draws = self.draws(epoch)
        for b in range(start, len(self)):
            batch = self.batch(b, draws)
            if batch is not None:
                yield batch
