"""scikit-learn's bundled 8x8 digits as 32x32 RGB: the embedded dataset (no download) of the quickstart."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import DATASETS
from .splits import Dataset, Split, channel_stats


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
