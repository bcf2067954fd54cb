"""STL-10 (5,000 train / 8,000 test / 100,000 unlabelled, 3x96x96) from the official binary files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslab.data.dataset import ImageDataset
from sslab.data.download import fetch
from sslab.data.locations import Found, child_entries, squash
from sslab.data.scratch import image_buffer
from sslab.errors import DatasetError

NATIVE_SIZE = 96
BINARY_FOLDER = "stl10_binary"
FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
UNLABELLED_FILE = "unlabeled_X.bin"  # optional: without it the dataset has no unlabelled split
_CHUNK = 2048  # unlabelled images re-laid out per step: bounds the memory the first decode needs
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


def decode(found: Found, scratch: Path) -> ImageDataset:
    """Read the labelled train and test splits, and the unlabelled one where its file is present. The
    unlabelled images are re-laid out chunk by chunk into a file in `scratch`, unlinked at once, so they
    never need to fit in RAM: the mapping pages them out, and the file's space is freed when it goes."""
    splits = [_read_split(found.path, split) for split in ("train", "test")]
    unlabelled = _read_unlabelled(found.path / UNLABELLED_FILE, scratch)
    return ImageDataset("stl10", *splits[0], *splits[1], CLASSES, unlabelled_images=unlabelled)


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


def _read_unlabelled(path: Path, scratch: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    per_image = 3 * NATIVE_SIZE * NATIVE_SIZE
    try:
        source = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise DatasetError(f"cannot read STL-10 unlabelled images {path} ({exc}); check the file") from exc
    if source.size % per_image:
        raise DatasetError(f"STL-10 unlabelled file {path} is truncated; re-download it")
    count = source.size // per_image
    images = image_buffer(count, NATIVE_SIZE, scratch)
    stored = source.reshape(count, 3, NATIVE_SIZE, NATIVE_SIZE)
    for start in range(0, count, _CHUNK):
        chunk = stored[start : start + _CHUNK].transpose(0, 1, 3, 2)  # stored column-major per channel
        images[start : start + _CHUNK] = torch.from_numpy(np.ascontiguousarray(chunk))
    return images
