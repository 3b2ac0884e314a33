"""The training batches of a dataset, on the pipeline it was loaded for (``data.pipeline``)."""
from __future__ import annotations

import torch

from ..distributed import DistInfo
from .augment import Normalizer
from .file_stream import StreamBatches, workers
from .resident import BatchStream
from .view_augment import check_views


def training_batches(dataset, num_views: int, cfg, device: torch.device, dist: DistInfo = DistInfo()):
    """The training batches of ``dataset`` on its pipeline: ``BatchStream`` (resident) or ``StreamBatches``."""
    normalize = Normalizer(dataset.mean, dataset.std, device)
    d, t = cfg.data, cfg.train
    recipes = check_views(d.views, num_views, cfg.method.name) if d.views is not None else None
    if dataset.pipeline == "resident":
        return BatchStream(dataset.train, normalize, num_views, t.batch_size, d.pad, d.flip, cfg.seed, device,
                           t.channels_last, dist, d.sampler, d.m_per_class, recipes)
    return StreamBatches(dataset.train, normalize, num_views, t.batch_size, dataset.image_size, dataset.augment,
                         d.pad, d.flip, d.crop_scale, cfg.seed, device, workers(d, dist), t.channels_last, dist,
                         d.sampler, d.m_per_class, recipes)
