"""Datasets and the training batch stream. Importing this package imports every module in it,
so a dataset loader in a new file here, decorated with ``@DATASETS.register``, is found."""
from ..registry import import_submodules
from .augment import EpochDraws, Normalizer, crop_flip, derive_seed, epoch_order
from .batches import training_batches
from .datasets import DATASETS, load_dataset
from .resident import Batch, BatchStream
from .splits import Dataset, Split

import_submodules(__name__, __path__, DATASETS)

__all__ = ["DATASETS", "Batch", "BatchStream", "Dataset", "EpochDraws", "Normalizer", "Split", "crop_flip",
           "derive_seed", "epoch_order", "load_dataset", "training_batches"]
