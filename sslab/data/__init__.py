"""Image datasets as uint8 tensors: the embedded default, standard sets, user folders, and test data."""

from sslab.data.dataset import DatasetWarning, ImageDataset
from sslab.data.registry import DATASET_NAMES, DEFAULT_DATASET, DatasetStatus, dataset_status, load_dataset

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_DATASET",
    "DatasetStatus",
    "DatasetWarning",
    "ImageDataset",
    "dataset_status",
    "load_dataset",
]
