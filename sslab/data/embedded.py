"""The Fashion-MNIST subset shipped inside the package (the default dataset)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from sslab.data.dataset import ImageDataset
from sslab.errors import DatasetError

EMBEDDED_NAME = "fashion-mnist-mini"
EMBEDDED_FILE = "fashion_mnist_mini.npz"


def embedded_path() -> Path:
    """Location of the embedded .npz inside the installed package."""
    return Path(str(resources.files("sslab.data").joinpath("embedded", EMBEDDED_FILE)))


def load_embedded() -> ImageDataset:
    """Load the embedded subset: 10,000 train / 2,000 test 1x28x28 images, 10 balanced classes."""
    path = embedded_path()
    try:
        with np.load(path, allow_pickle=False) as npz:
            return ImageDataset(
                name=EMBEDDED_NAME,
                train_images=torch.from_numpy(npz["train_images"][:, None].copy()),
                train_labels=torch.from_numpy(npz["train_labels"].astype(np.int64)),
                test_images=torch.from_numpy(npz["test_images"][:, None].copy()),
                test_labels=torch.from_numpy(npz["test_labels"].astype(np.int64)),
                classes=tuple(str(name) for name in npz["classes"]),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(
            f"the embedded dataset {path} is missing or damaged ({type(exc).__name__}); reinstall sslab"
        ) from exc
