from .augment import EpochDraws, Normalizer, crop_flip, derive_seed
from .datasets import DATASETS, Dataset, Split, load_dataset

__all__ = ["DATASETS", "Dataset", "EpochDraws", "Normalizer", "Split", "crop_flip", "derive_seed", "load_dataset"]
