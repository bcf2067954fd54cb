"""The in-memory image dataset every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslab.errors import DatasetError


class DatasetWarning(UserWarning):
    """A problem with a dataset that does not stop it from loading (e.g. skipped files)."""


# eq=False: the generated __eq__ would compare tensors elementwise and fail; identity is what callers need.
@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A labelled image dataset held as uint8 tensors of shape (N, C, H, W) with square images."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    # Images without labels that pretraining may also use (STL-10's 100,000), often memory-mapped; or None.
    unlabelled_images: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_split(self.name, "train", self.train_images, self.train_labels, len(self.classes))
        _check_split(self.name, "test", self.test_images, self.test_labels, len(self.classes))
        extra = self.unlabelled_images
        if extra is not None and (
            extra.dtype != torch.uint8
            or extra.shape[1:] != self.train_images.shape[1:]
            or extra.device.type != "cpu"
        ):
            shape = tuple(self.train_images.shape[1:])
            raise DatasetError(
                f"{self.name}: unlabelled images must be uint8 {shape} on the CPU like the train images, "
                f"got {extra.dtype} {tuple(extra.shape[1:])}; the source files are malformed"
            )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(
                f"{self.name}: train images are {tuple(self.train_images.shape[1:])} but test images are "
                f"{tuple(self.test_images.shape[1:])}; the source files are inconsistent"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Channels per image (1 for grayscale, 3 for RGB)."""
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        """Height (= width) of the images in pixels."""
        return int(self.train_images.shape[2])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_labels)}, test={len(self.test_labels)}, "
            f"unlabelled={0 if self.unlabelled_images is None else len(self.unlabelled_images)}, "
            f"channels={self.channels}, image_size={self.image_size}, num_classes={self.num_classes})"
        )


def _check_split(name: str, split: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise DatasetError unless images/labels have the documented dtype, layout and label range."""
    problem = None
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
        problem = (
            f"{split} images must be uint8 (N, C, H, W) with H == W, got {images.dtype} {tuple(images.shape)}"
        )
    elif labels.dtype != torch.int64 or labels.ndim != 1 or len(labels) != len(images):
        problem = (
            f"{split} labels must be int64 (N,) matching {len(images)} images, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    elif not images.is_contiguous() or images.device.type != "cpu":
        problem = f"{split} images must be a contiguous CPU tensor"
    elif len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        problem = (
            f"{split} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    if problem:
        raise DatasetError(f"{name}: {problem}; the source files are malformed")
