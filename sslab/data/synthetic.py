"""Tiny procedural dataset for unit tests: coloured shapes on noisy backgrounds, generated in milliseconds."""

from __future__ import annotations

import math

import torch

from sslab.data.dataset import ImageDataset

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "purple": (120, 50, 170),
    "white": (235, 235, 235),
    "brown": (130, 80, 40),
}
_SHAPES = ("disk", "square", "ring", "stripes", "cross")
CLASSES = tuple(f"{colour}-{_SHAPES[i % len(_SHAPES)]}" for i, colour in enumerate(_COLOURS))


def make_synthetic(
    image_size: int = 32, train_per_class: int = 100, test_per_class: int = 20, seed: int = 0
) -> ImageDataset:
    """10 classes of 3 x image_size x image_size shapes (class = colour + shape), deterministic per seed.

    Each image jitters the shape's position, size and colour and adds pixel noise on a random grey
    background, so the classes are learnable but not trivially separable by a single pixel.
    """
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = _split(train_per_class, image_size, generator)
    test_images, test_labels = _split(test_per_class, image_size, generator)
    return ImageDataset("synthetic", train_images, train_labels, test_images, test_labels, CLASSES)


def _split(per_class: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images of every class, interleaved (labels 0, 1, ..., 9, 0, 1, ...)."""
    n = per_class * len(CLASSES)
    labels = torch.arange(n) % len(CLASSES)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator))[:, None, None]

    axis = torch.linspace(-1.0, 1.0, size)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    radius = uniform(0.35, 0.6)
    dx, dy = xs - uniform(-0.25, 0.25), ys - uniform(-0.25, 0.25)
    dist = (dx**2 + dy**2).sqrt()
    inside_box = (dx.abs() < radius) & (dy.abs() < radius)
    masks = torch.stack(
        [
            dist < radius,
            (dx.abs() < 0.85 * radius) & (dy.abs() < 0.85 * radius),
            (dist - 0.75 * radius).abs() < 0.25 * radius,
            inside_box & (torch.sin(dy * 3 * math.pi / radius) > 0),
            inside_box & ((dx.abs() < 0.3 * radius) | (dy.abs() < 0.3 * radius)),
        ],
        dim=1,
    )  # (n, shapes, size, size)
    mask = masks[torch.arange(n), labels % len(_SHAPES)][:, None]

    palette = torch.tensor(list(_COLOURS.values()), dtype=torch.float32)
    colour = palette[labels] + 15 * torch.randn(n, 3, generator=generator)
    background = uniform(30.0, 90.0)[:, :, :, None]
    noise = 12 * torch.randn(n, 3, size, size, generator=generator)
    images = torch.where(mask, colour[:, :, None, None], background) + noise
    return images.round_().clamp_(0, 255).to(torch.uint8).contiguous(), labels.to(torch.int64)
