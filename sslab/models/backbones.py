"""Backbones: images (N, C, H, W) -> features h (N, D)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torchvision
from torch import nn

from sslab.errors import ConfigError

if TYPE_CHECKING:

    class Backbone(nn.Module):
        """An encoder: images (N, C, H, W) -> features h (N, feature_dim)."""

        feature_dim: int

else:
    # For the type checker only: a backbone is any module with an int `feature_dim` attribute (torchvision's
    # ResNet gets one set on it), so at run time the name is nn.Module itself.
    Backbone = nn.Module


class SmallCNN(Backbone):
    """A fast conv net (~0.37M parameters, ~10M multiply-adds at 32 px) for CPU-scale studies.

    Three 3x3 conv + batch-norm + ReLU stages, each halving the resolution. Downsampling in the first
    layer keeps full-resolution activations, whose batch-norm and backward passes are memory-bound on a
    CPU, out of the network.
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)  # (N, D)


def _resnet(
    factory: Callable[..., torchvision.models.ResNet], in_channels: int, cifar_stem: bool
) -> Backbone:
    model = factory(weights=None)
    if cifar_stem:
        # Small images lose too much resolution to a 7x7 stride-2 stem and a max-pool (SimCLR appendix B.9).
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return cast(Backbone, model)


BACKBONES: dict[str, str] = {
    "smallcnn": "3-stage CNN, ~0.37M parameters, 256-d features (fast CPU studies)",
    "resnet18": "torchvision ResNet-18, 512-d features",
    "resnet50": "torchvision ResNet-50, 2048-d features",
}


def build_backbone(name: str, in_channels: int, image_size: int, cifar_stem: bool | None = None) -> Backbone:
    """Build a randomly initialised backbone with a `feature_dim` attribute."""
    stem = image_size <= 64 if cifar_stem is None else cifar_stem
    if name == "smallcnn":
        return SmallCNN(in_channels)
    if name == "resnet18":
        return _resnet(torchvision.models.resnet18, in_channels, stem)
    if name == "resnet50":
        return _resnet(torchvision.models.resnet50, in_channels, stem)
    raise ConfigError(f"unknown backbone '{name}'; valid backbones: {', '.join(BACKBONES)}")
