"""How an epoch's training images are ordered into global batches (``data.sampler``), on both data paths.

``shuffle`` (default): a permutation of the training images, cut into batches of ``train.batch_size``
(the last partial batch kept). ``m_per_class``: MCL's class-balanced batches (winycg/MCL
``dataset/class_sampler.py``, ``MPerClassSampler(labels, m=2, batch_size=128, length_before_new_iter=N)``):
every batch holds ``batch_size / m`` distinct classes, drawn afresh for each batch, with ``m`` distinct
images of each, drawn with replacement across batches (an image may appear twice in an epoch, another
not at all); an "epoch" is ``floor(N / batch_size)`` such batches (390 at 50,000 images and 128). So every
anchor of a contrastive loss has ``m - 1`` positives in its batch.

Both orders derive from (seed, epoch) alone, drawn on the CPU with vectorised tensor operations (no
per-image Python), so a run resumed at batch b continues with the batches it would have had, and the
draws are the same on every device. Under torchrun every rank takes its contiguous slice of each global
batch; with ``m_per_class`` the slices must keep each class's m images together, so ``batch_size`` must
be a multiple of ``m`` times the world size.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import ConfigError
from .augment import derive_seed, epoch_order

SAMPLERS = ("shuffle", "m_per_class")


def distinct_draws(sizes: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """For each entry n of ``sizes`` (S,), m distinct uniform draws from range(n): an (S, m) tensor.

    Sequential sampling without replacement, vectorised: the t-th draw is uniform on the n - t values not
    yet taken, found by stepping a uniform draw from range(n - t) past the taken values in ascending order.
    """
    taken = torch.empty(sizes.numel(), 0, dtype=torch.int64)
    for t in range(m):
        r = (torch.rand(sizes.numel(), generator=generator, dtype=torch.float64) * (sizes - t)).long()
        r = torch.minimum(r, sizes - t - 1)  # float rounding at the top of the range
        for j in range(t):  # taken is sorted ascending along its columns
            r = r + (r >= taken[:, j]).long()
        taken = torch.sort(torch.cat([taken, r[:, None]], dim=1), dim=1).values
    # the draws of one row in a random order (the sort above is ours, not the sampler's)
    return taken.gather(1, torch.rand(taken.shape, generator=generator).argsort(dim=1))


class Sampling:
    """An epoch's order of training images for ``data.sampler``; ``order(seed, epoch)`` is the same everywhere."""

    def __init__(self, labels: torch.Tensor, batch_size: int, sampler: str = "shuffle", m: int = 2,
                 world_size: int = 1):
        self.num_images, self.batch_size, self.sampler, self.m = int(labels.numel()), batch_size, sampler, m
        if sampler not in SAMPLERS:
            raise ConfigError(f"config key 'data.sampler' must be {' or '.join(SAMPLERS)}, got '{sampler}'")
        if sampler == "m_per_class":
            classes, counts = torch.unique(labels.cpu(), return_counts=True)
            per_batch = batch_size // m if m > 0 else 0
            if m < 1 or batch_size % (m * world_size):
                raise ConfigError(f"data.sampler m_per_class needs train.batch_size ({batch_size}) to be a multiple "
                                  f"of data.m_per_class ({m}) x the world size ({world_size})")
            if per_batch > classes.numel():
                raise ConfigError(f"data.sampler m_per_class draws {per_batch} classes per batch (train.batch_size "
                                  f"{batch_size} / data.m_per_class {m}) but the training set has "
                                  f"{classes.numel()}; raise data.m_per_class")
            if int(counts.min()) < m:
                raise ConfigError(f"data.sampler m_per_class needs {m} images of every class, but class "
                                  f"{int(classes[counts.argmin()])} has {int(counts.min())}")
            if self.num_images < batch_size:
                raise ConfigError(f"data.sampler m_per_class needs at least train.batch_size ({batch_size}) "
                                  f"training images, got {self.num_images}")
            self.classes, self.counts = classes, counts
            self.by_class = torch.argsort(labels.cpu(), stable=True)  # the images of each class, contiguous
            self.starts = torch.cumsum(counts, 0) - counts
            self.per_batch = per_batch

    @property
    def length(self) -> int:
        """Positions in an epoch (the images it draws, repeats included)."""
        if self.sampler == "shuffle":
            return self.num_images
        return self.num_images - self.num_images % self.batch_size

    def __len__(self) -> int:
        """Global batches per epoch."""
        return -(-self.length // self.batch_size)

    def order(self, seed: int, epoch: int) -> Tuple[torch.Tensor, torch.Generator]:
        """The epoch's image index at every position, and the generator it was drawn from (the resident path
        draws the epoch's crops and flips from it next)."""
        if self.sampler == "shuffle":
            return epoch_order(self.num_images, seed, epoch)
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))  # the shuffle's stream
        batches = len(self)
        # per batch: a random permutation of the classes, its first batch_size / m taken
        picked = torch.rand(batches, self.classes.numel(), generator=generator).argsort(dim=1)[:, :self.per_batch]
        picked = picked.reshape(-1)
        within = distinct_draws(self.counts[picked], self.m, generator)  # (batches * per_batch, m)
        return self.by_class[self.starts[picked][:, None] + within].reshape(-1), generator


__all__ = ["SAMPLERS", "Sampling", "distinct_draws"]
