"""Antialiased resizing of uint8 image tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslab.data.dataset import ImageDataset
from sslab.errors import DatasetError

# Images per interpolate call: bounds the float32 working memory (e.g. 512 x 3 x 224 x 224 x 4 B = 300 MB).
_BATCH = 512


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to (N, C, size, size), antialiased bilinear, in batches."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _BATCH):
        batch = images[start : start + _BATCH].float()
        resized = F.interpolate(
            batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + _BATCH] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (C, H, W) image so its short side is `size`, then center-crop it to size x size."""
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = F.interpolate(
        image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    cropped = resized[:, top : top + size, left : left + size]
    return cropped.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def resize_dataset(dataset: ImageDataset, size: int | None) -> ImageDataset:
    """Return `dataset` with both splits resized to `size` (unchanged when `size` is None or native)."""
    if size is None or size == dataset.image_size:
        return dataset
    return ImageDataset(
        name=dataset.name,
        train_images=resize_images(dataset.train_images, size),
        train_labels=dataset.train_labels,
        test_images=resize_images(dataset.test_images, size),
        test_labels=dataset.test_labels,
        classes=dataset.classes,
        unlabelled_images=None
        if dataset.unlabelled_images is None
        else resize_images(dataset.unlabelled_images, size),
    )


def match_channels(dataset: ImageDataset, channels: int) -> ImageDataset:
    """`dataset` with `channels` channels: grey repeated to RGB, or RGB to grey by ITU-R 601 luma."""
    if dataset.channels == channels:
        return dataset
    if not (dataset.channels == 1 or (dataset.channels == 3 and channels == 1)):
        raise DatasetError(
            f"{dataset.name} has {dataset.channels} channels; a model for {channels}-channel images cannot "
            "read it"
        )

    def convert(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            return images.expand(-1, channels, -1, -1).contiguous()
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * luma).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)

    return ImageDataset(
        name=dataset.name,
        train_images=convert(dataset.train_images),
        train_labels=dataset.train_labels,
        test_images=convert(dataset.test_images),
        test_labels=dataset.test_labels,
        classes=dataset.classes,
    )
