"""Batched augmentation on uint8 tensors, on whatever device holds them.

RandomCrop(32, padding=pad) with zero padding applied to the uint8 image (as
torchvision does, i.e. before normalisation) and a horizontal flip with p=0.5,
fused into one gather: no PIL, no per-image Python. Random draws come from a
CPU generator seeded per epoch, so they are identical on every device and a
resumed run redraws exactly what an uninterrupted run would.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .view_augment import draw


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from (run seed, epoch, stream...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop each padded image at ``offsets`` (N x 2: top, left) and mirror where ``flips``.

    images: uint8 N x C x H x W. Returns uint8 N x C x H x W. One ``gather`` over
    the flattened padded planes (3x faster on CPU than 4-D advanced indexing).
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    width = w + 2 * pad
    dev = images.device
    offsets, flips = offsets.to(dev), flips.to(dev)
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # N x H
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols) + offsets[:, 1:2]  # N x W
    index = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, index).reshape(n, c, h, w)


class Normalizer:
    def __init__(self, mean: Sequence[float], std: Sequence[float], device):
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, dtype=torch.float32, device=device) /
                      torch.tensor(std, dtype=torch.float32, device=device)).view(1, -1, 1, 1)

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        # (x/255 - mean)/std written as one multiply-add
        return images_u8.float() * self.scale - self.shift


def epoch_order(num_images: int, seed: int, epoch: int) -> Tuple[torch.Tensor, torch.Generator]:
    """The epoch's order of the training images, on both data paths, and the generator it was drawn
    from: the resident path draws the epoch's crops and flips from it next (``EpochDraws``)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    return torch.randperm(num_images, generator=generator), generator


class EpochDraws:
    """Data order and per-view augmentation parameters of one epoch (the resident path): one crop offset and
    flip per position of the epoch (an image the sampler draws twice gets two). ``sampling`` (an
    ``okd.data.sampling.Sampling``) orders the epoch; None: a permutation of the ``num_images``."""

    def __init__(self, num_images: int, num_views: int, pad: int, flip: bool, seed: int, epoch: int,
                 sampling=None, recipes=None, size=(32, 32)):
        self.order, gen = epoch_order(num_images, seed, epoch) if sampling is None else sampling.order(seed, epoch)
        positions = self.order.numel()
        self.offsets = torch.randint(0, 2 * pad + 1, (num_views, positions, 2), generator=gen)
        if flip:
            self.flips = torch.randint(0, 2, (num_views, positions), generator=gen).bool()
        else:
            self.flips = torch.zeros(num_views, positions, dtype=torch.bool)
        # data.views: each view's own operations (okd.data.view_augment), drawn after the crops and flips, so the
        # default views are drawn exactly as before; a recipe without flip leaves its view unflipped
        self.params = [None] * num_views
        for v, ops in enumerate(recipes or []):
            if "flip" not in ops:
                self.flips[v] = False
            self.params[v] = draw(ops, positions, size, gen)
