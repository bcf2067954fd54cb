"""Fashion-MNIST from the four original IDX files (gzip-compressed or not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslab.data.dataset import ImageDataset
from sslab.data.download import fetch
from sslab.data.idx import read_idx
from sslab.data.locations import Found
from sslab.errors import DatasetError

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Subfolders checked below a search root: the conventional name and torchvision's download layout.
_SUBFOLDERS = ("", "fashion-mnist", "FashionMNIST/raw")


def idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (the .gz one where both exist), or None unless all four are there."""
    files = {}
    for key, stem in FILES.items():
        candidates = [folder / f"{stem}.gz", folder / stem]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            return None
        files[key] = found
    return files


def probe(root: Path, loose: bool = False) -> Found | None:
    """Fashion-MNIST at `root` or in its conventional subfolders."""
    for sub in _SUBFOLDERS:
        folder = root / sub if sub else root
        if idx_files(folder) is not None:
            return Found(folder, "idx")
    return None


def decode(found: Found) -> ImageDataset:
    """Read the IDX files of `found` into a 1-channel uint8 dataset."""
    files = idx_files(found.path)
    if files is None:
        raise DatasetError(f"{found.path} no longer holds the four Fashion-MNIST IDX files; restore them")
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{found.path}: {split} IDX files disagree (images {images.shape}, labels {labels.shape}); "
                "replace them with the original files"
            )
    return ImageDataset(
        name="fashion-mnist",
        train_images=_images(arrays["train_images"]),
        train_labels=_labels(arrays["train_labels"]),
        test_images=_images(arrays["test_images"]),
        test_labels=_labels(arrays["test_labels"]),
        classes=CLASSES,
    )


def download(dest: Path) -> None:
    """Download Fashion-MNIST with torchvision into `dest` (files land in dest/FashionMNIST/raw)."""
    from torchvision.datasets import FashionMNIST

    def both_splits(root: Path) -> None:
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)

    fetch("fashion-mnist", dest, both_splits)


def _images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array[:, None]).copy())


def _labels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64))
