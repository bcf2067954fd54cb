"""Backbones: images (N, C, H, W) -> features h (N, D)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torchvision
from torch import nn

from sslab.errors import ConfigError
from sslab.models import cpu_kernels

if TYPE_CHECKING:
    from sslab.config import TrialConfig

    class Backbone(nn.Module):
        """An encoder: images (N, C, H, W) -> features h (N, feature_dim)."""

        feature_dim: int
        channels_last: bool  # whether the trainer feeds it channels-last tensors (faster convolutions)

else:
    # For the type checker only: a backbone is any module with an int `feature_dim` and a bool
    # `channels_last` attribute, so at run time the name is nn.Module itself.
    Backbone = nn.Module


class SmallCNN(Backbone):
    """A fast conv net (~0.37M parameters, ~10M multiply-adds at 32 px) for CPU-scale studies.

    Three 3x3 conv + batch-norm + ReLU stages, each halving the resolution. Downsampling in the first
    layer keeps full-resolution activations, whose batch-norm and backward passes are memory-bound on a
    CPU, out of the network.
    """

    channels_last = True

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [
                cpu_kernels.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = cpu_kernels.GlobalAvgPool()
        self.feature_dim = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)  # (N, D)


class ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every layer's channel count multiplied by `width` (SimCLR's ResNet-50 (2x)).

    torchvision's `width_per_group` widens only a bottleneck's inner 3x3 conv, so the layers are built here
    with 64 * width base channels. At width 1 this is torchvision's model, drawn in the same order from the
    random stream, so the weights are those of `torchvision.models.resnet18()` under the same seed.
    """

    channels_last = True

    def __init__(
        self,
        block: type[torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck],
        layers: list[int],
        width: float = 1.0,
    ) -> None:
        nn.Module.__init__(self)
        base = round(64 * width)
        if base < 1:
            raise ConfigError(f"resnet_width {width} leaves no channels (64 * width must round to >= 1)")
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups = base, 1, 1
        self.base_width = 64  # a bottleneck's inner width = its planes, which carry the scaling
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # the CIFAR stem drops it
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.avgpool = cpu_kernels.GlobalAvgPool()
        self.feature_dim = self.inplanes
        # torchvision's 1000-way classifier draws its initial weights here; drawing them too keeps the random
        # stream, and so every weight initialised after it, identical to torchvision's. It is then dropped.
        nn.Linear(self.feature_dim, 1000)
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


_RESNET_LAYERS = {
    "resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
}


def _resnet(name: str, in_channels: int, cifar_stem: bool, width: float) -> Backbone:
    block, layers = _RESNET_LAYERS[name]
    model = ScaledResNet(block, layers, width)
    stem = model.conv1.out_channels
    if cifar_stem:
        # Small images lose too much resolution to a 7x7 stride-2 stem and a max-pool (SimCLR appendix B.9).
        model.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
    return cast(Backbone, cpu_kernels.adopt(model))


BACKBONES: dict[str, str] = {
    "smallcnn": "3-stage CNN, ~0.37M parameters, 256-d features (fast CPU studies)",
    "resnet18": "torchvision ResNet-18, 512-d features (x resnet_width)",
    "resnet50": "torchvision ResNet-50, 2048-d features (x resnet_width)",
    "vit_micro": "ViT, 4 blocks of width 128, 4 heads, 0.8M parameters, 128-d features (CPU-scale ViTs)",
    "vit_tiny": "ViT-Ti (DeiT), 12 blocks of width 192, 3 heads, 5.4M parameters, 192-d features",
    "vit_small": "ViT-S (DeiT), 12 blocks of width 384, 6 heads, 21M parameters, 384-d features",
}


def build_backbone(
    name: str,
    in_channels: int,
    image_size: int,
    cifar_stem: bool | None = None,
    *,
    patch_size: int | None = None,
    vit_pool: str = "cls",
    resnet_width: float = 1.0,
) -> Backbone:
    """Build a randomly initialised backbone with `feature_dim` and `channels_last` attributes.

    `cifar_stem` and `resnet_width` apply to ResNets, `patch_size` (None: 4 px up to 32-px images, 8 up
    to 96, else 16) and `vit_pool` (cls | mean) to ViTs.
    """
    stem = image_size <= 64 if cifar_stem is None else cifar_stem
    if name == "smallcnn":
        return SmallCNN(in_channels)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, stem, resnet_width)
    if name.startswith("vit_") and name in BACKBONES:
        from sslab.models.vit import ViT  # imports timm: only when a ViT is built

        return cast(Backbone, ViT(name, in_channels, image_size, patch_size, vit_pool))
    raise ConfigError(f"unknown backbone '{name}'; valid backbones: {', '.join(BACKBONES)}")


def backbone_for(config: TrialConfig, in_channels: int, image_size: int) -> Backbone:
    """The backbone a trial's config describes, for images of this format (the one place that reads the
    backbone fields, so the trainer, methods with encoders of their own and teachers all build alike)."""
    return build_backbone(
        config.backbone,
        in_channels,
        image_size,
        config.cifar_stem,
        patch_size=config.patch_size,
        vit_pool=config.vit_pool,
        resnet_width=config.resnet_width,
    )
