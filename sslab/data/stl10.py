"""STL-10's labelled splits (5,000 train / 8,000 test, 3x96x96) from the official binary files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslab.data.dataset import ImageDataset
from sslab.data.download import fetch
from sslab.data.locations import Found, child_entries, squash
from sslab.errors import DatasetError

NATIVE_SIZE = 96
BINARY_FOLDER = "stl10_binary"
FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def probe(root: Path, loose: bool = False) -> Found | None:
    """STL-10 binaries at `root`, in `root/stl10_binary`, or in a folder below `root` named like stl10."""
    folders = [root, root / BINARY_FOLDER]
    for child in child_entries(root):
        if child.is_dir() and squash(child.name).startswith("stl10"):
            folders += [child, child / BINARY_FOLDER]
    for folder in folders:
        if all((folder / name).is_file() for name in FILES):
            return Found(folder, "binary")
    return None


def decode(found: Found) -> ImageDataset:
    """Read the labelled train and test splits (the unlabelled split is not used)."""
    splits = [_read_split(found.path, split) for split in ("train", "test")]
    return ImageDataset("stl10", *splits[0], *splits[1], CLASSES)


def download(dest: Path) -> None:
    """Download and extract the official archive (about 2.6 GB) with torchvision into `dest`."""
    from torchvision.datasets import STL10

    fetch("stl10", dest, lambda root: STL10(str(root), split="test", download=True))


def _read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        pixels = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
        labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1  # stored 1-based
    except OSError as exc:
        raise DatasetError(f"cannot read STL-10 {split} files in {folder} ({exc}); restore them") from exc
    per_image = 3 * NATIVE_SIZE * NATIVE_SIZE
    if pixels.size % per_image or pixels.size // per_image != len(labels):
        raise DatasetError(f"STL-10 {split} files in {folder} are truncated; re-download them")
    # Stored column-major per channel: swap H and W.
    images = pixels.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 1, 3, 2)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
