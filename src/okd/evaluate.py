"""Test-set evaluation: top-1 (and top-5 with more than 10 classes) of every model a method has."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from . import distributed
from .data import Normalizer, Split
from .distributed import DistInfo
from .methods import Method


class TestSet:
    """The test split on the device, evaluated in batches; each torchrun rank takes one contiguous shard."""

    def __init__(self, split: Split, normalize: Normalizer, num_classes: int, batch_size: int,
                 device: torch.device, dist: DistInfo = DistInfo()):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.normalize, self.num_classes, self.batch_size, self.dist = normalize, num_classes, batch_size, dist

    def evaluate(self, method: Method) -> Dict:
        return evaluate(method, self.images, self.labels, self.normalize, self.batch_size, self.num_classes,
                        self.dist)


@torch.no_grad()
def evaluate(method: Method, images_u8: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
             batch_size: int, num_classes: int, dist: DistInfo = DistInfo()) -> Dict:
    """Accuracies in percent, {"top1": {model: %}, "count": n[, "top5": ...]}.

    Under torchrun the correct counts of the shards are summed, so every image
    is counted exactly once.
    """
    was_training = method.training
    method.eval()
    k = 5 if num_classes > 10 else 1
    shard = torch.arange(labels.numel()).tensor_split(dist.world_size)[dist.rank]
    start, stop = (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)
    names: List[str] = []
    counts: Optional[torch.Tensor] = None  # (models, 2): top-1 and top-k hits
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        outputs = method.evaluate_logits(normalize(images_u8[lo:hi]))
        names = list(outputs)
        hits = [hit_counts(logits, labels[lo:hi], k) for logits in outputs.values()]
        counts = torch.stack(hits) if counts is None else counts + torch.stack(hits)
    if not names:  # a rank without test images still learns the model names, and joins the sums
        names = list(method.evaluate_logits(normalize(images_u8[:1])).keys())
    if counts is None:
        counts = torch.zeros(len(names), 2, dtype=torch.long, device=labels.device)
    total = torch.tensor([stop - start], device=labels.device)
    distributed.all_reduce_sum(counts)
    distributed.all_reduce_sum(total)
    method.train(was_training)
    n = int(total)
    counts = counts.tolist()
    result = {"top1": {m: 100.0 * c[0] / n for m, c in zip(names, counts)}, "count": n}
    if k == 5:
        result["top5"] = {m: 100.0 * c[1] / n for m, c in zip(names, counts)}
    return result


def hit_counts(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(top-1 hits, top-k hits) of one batch."""
    hit = logits.topk(k, dim=1).indices.eq(labels[:, None])
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
