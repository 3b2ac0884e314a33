"""Test-set evaluation: top-1 (and top-5 with more than 10 classes) of every model a method has.

Under torchrun each rank evaluates one contiguous shard of the test split and the
correct counts are summed, so every test image is counted exactly once (no sampler
padding). The resident path slices its device tensor; the streaming path decodes its
shard in DataLoader workers (``okd.data.file_stream``). Inputs take the training's memory
format and precision (``Inference``): NCHW images into channels_last weights would make
every convolution convert them, and fp32 evaluation of a bf16 run is the slow half of
an epoch on a GPU. Accuracies are counted from the logits in fp32.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import distributed
from .data import Normalizer, Split
from .data.file_stream import EvalImages, eval_jobs, loader, on_device, workers
from .diagnostics import Diagnostics, numbered_groups
from .distributed import DistInfo
from .methods import Method
from .step import AUTOCAST_DTYPES


def shard_range(count: int, dist: DistInfo) -> Tuple[int, int]:
    """[start, stop) of this rank's contiguous shard of ``count`` images."""
    shard = torch.arange(count).tensor_split(dist.world_size)[dist.rank]
    return (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)


class Inference:
    """How test images enter the models: the run's memory format and autocast precision."""

    def __init__(self, device: torch.device, precision: str = "fp32", channels_last: bool = False):
        self.device_type, self.dtype = device.type, AUTOCAST_DTYPES.get(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @classmethod
    def of(cls, cfg, device: torch.device) -> "Inference":
        return cls(device, cfg.train.precision, bool(cfg.train.channels_last))

    def __call__(self, method: Method, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        images = images.contiguous(memory_format=self.memory_format)
        context = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else nullcontext()
        with context:
            return method.evaluate_logits(images)


class TestSet:
    """The test split on the device, evaluated in batches."""

    def __init__(self, split: Split, normalize: Normalizer, num_classes: int, batch_size: int,
                 device: torch.device, dist: DistInfo = DistInfo(), inference: Optional[Inference] = None):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.normalize, self.num_classes, self.batch_size, self.dist = normalize, num_classes, batch_size, dist
        self.inference = inference or Inference(device)

    def evaluate(self, method: Method) -> Dict:
        return evaluate(method, self.images, self.labels, self.normalize, self.batch_size, self.num_classes,
                        self.dist, self.inference)


class StreamTestSet:
    """The test files, decoded by DataLoader workers at every evaluation (resize + centre crop for ImageNet)."""

    def __init__(self, dataset, batch_size: int, num_workers: int, device: torch.device, dist: DistInfo = DistInfo(),
                 inference: Optional[Inference] = None):
        self.normalize = Normalizer(dataset.mean, dataset.std, device)
        self.inference = inference or Inference(device)
        self.num_classes, self.device, self.dist, self.size = dataset.num_classes, device, dist, dataset.image_size
        self.start, self.stop = shard_range(len(dataset.test), dist)
        self.loader = loader(EvalImages(dataset.test, dataset.image_size, dataset.augment),
                             eval_jobs(self.start, self.stop, batch_size), num_workers, device)

    def evaluate(self, method: Method) -> Dict:
        batches = ((self.normalize(images), labels) for _, images, labels in on_device(iter(self.loader), self.device))
        probe = lambda: torch.zeros(1, 3, self.size, self.size, device=self.device)  # noqa: E731
        return score(method, batches, self.stop - self.start, self.num_classes, self.dist, probe, self.inference)


def test_set(dataset, cfg, device: torch.device, dist: DistInfo = DistInfo()):
    """The evaluation of ``dataset`` on its pipeline."""
    inference = Inference.of(cfg, device)
    if dataset.pipeline == "resident":
        return TestSet(dataset.test, Normalizer(dataset.mean, dataset.std, device), dataset.num_classes,
                       cfg.train.eval_batch_size, device, dist, inference)
    return StreamTestSet(dataset, cfg.train.eval_batch_size, workers(cfg.data, dist), device, dist, inference)


@torch.no_grad()
def evaluate(method: Method, images_u8: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
             batch_size: int, num_classes: int, dist: DistInfo = DistInfo(),
             inference: Optional[Inference] = None) -> Dict:
    """Accuracies in percent of resident test images, {"top1": {model: %}, "count": n[, "top5": ...]}."""
    start, stop = shard_range(labels.numel(), dist)
    batches = ((normalize(images_u8[lo:min(lo + batch_size, stop)]), labels[lo:min(lo + batch_size, stop)])
               for lo in range(start, stop, batch_size))
    return score(method, batches, stop - start, num_classes, dist, lambda: normalize(images_u8[:1]), inference)


@torch.no_grad()
def score(method: Method, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], count: int, num_classes: int,
          dist: DistInfo, probe: Callable[[], torch.Tensor], inference: Optional[Inference] = None) -> Dict:
    """Sum the hits of this rank's ``count`` images over all ranks; ``probe()`` is any valid input (a rank
    without test images still learns the model names, and joins the sums)."""
    run = inference or (lambda m, x: m.evaluate_logits(x))
    was_training = method.training
    method.eval()
    k = 5 if num_classes > 10 else 1
    names: List[str] = []
    counts: Optional[torch.Tensor] = None  # (models, 2): top-1 and top-k hits
    diagnostics: Optional[Diagnostics] = None  # diversity and calibration sums (okd.diagnostics)
    device = None
    for inputs, labels in batches:
        outputs = run(method, inputs)
        names, device = list(outputs), labels.device
        hits = torch.stack([hit_counts(logits, labels, k) for logits in outputs.values()])
        counts = hits if counts is None else counts + hits
        if diagnostics is None:
            diagnostics = Diagnostics(names, groups_of(method, names), device)
        diagnostics.add(outputs, labels)
    if not names:
        example = probe()
        names, device = list(method.evaluate_logits(example).keys()), example.device
    if counts is None:
        counts = torch.zeros(len(names), 2, dtype=torch.long, device=device)
    if diagnostics is None:  # a rank without test images still joins the sums
        diagnostics = Diagnostics(names, groups_of(method, names), device)
    total = torch.tensor([count], device=device)
    distributed.all_reduce_sum(counts)
    distributed.all_reduce_sum(total)
    for sums in diagnostics.tensors():
        distributed.all_reduce_sum(sums)
    method.train(was_training)
    n = int(total)
    counts = counts.tolist()
    result = {"top1": {m: 100.0 * c[0] / n for m, c in zip(names, counts)}, "count": n}
    if k == 5:
        result["top5"] = {m: 100.0 * c[1] / n for m, c in zip(names, counts)}
    result["diagnostics"] = diagnostics.result(n, result["top1"])
    return result


def groups_of(method, names: List[str]) -> Dict[str, List[str]]:
    """The method's member groups; anything with ``evaluate_logits`` alone gets the numbered groups."""
    choose = getattr(method, "diagnostic_groups", None)
    return choose(names) if choose is not None else numbered_groups(names)


def hit_counts(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(top-1 hits, top-k hits) of one batch."""
    hit = logits.float().topk(k, dim=1).indices.eq(labels[:, None])
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
