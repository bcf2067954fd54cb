"""Colourisation (Zhang, Isola & Efros 2016): predict a grey image's colours as distributions over ab bins.

The first view, back in [0, 1] RGB, is converted to CIE Lab. The backbone sees its lightness L (L / 100, a
grey image) replicated to the backbone's 3 channels and normalised like the views, so that it stays an RGB
backbone the evaluation can probe on ordinary images (the paper's network takes L alone; the probe here
shows it colour images, which it never saw in training). A decoder maps h to logits over the Q in-gamut ab
bins on a `grid` x `grid` map; the target is the view's ab map average-pooled to that grid and soft-encoded
over its 5 nearest bins (Gaussian, sigma 5). The loss is the multinomial cross entropy (eq. 2), each cell
weighted by the rebalancing weight of its most likely bin (eq. 4): the empirical bin distribution p is the
running sum of the soft targets of every batch seen so far (the paper takes it from all of ImageNet before
training), smoothed by a Gaussian of sigma 5 and mixed with a uniform (lambda) before inversion.
Colour needs 3 channels: on single-channel data the method refuses to be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.augment.color_space import rgb_to_lab
from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.pretext_ops import (
    ab_bins,
    colorization_loss,
    input_channels,
    rebalance_weights,
    smooth_prior,
    soft_encode,
)
from sslab.models import Backbone
from sslab.settings import MethodSettings, Setting

NEIGHBOURS, SIGMA = 5, 5.0  # soft-encoding: 5 nearest bins, Gaussian sigma 5 (also the prior's smoothing)
DECODER_WIDTH = 64  # channels of the decoder's cells: small next to the backbone, which carries the features


class ColorizeSettings(MethodSettings):
    name = "colorize"
    paper = "Zhang, Isola & Efros 2016, Colorful Image Colorization"
    # No colour jitter or grayscale: the view's colours are the target.
    shared_defaults = {"aug": "crop(scale=0.2-1),flip"}
    ignores = ("head", "head_width", "out_dim", "head_bn")  # the decoder is the task head

    bin_size = Setting(10.0, "side of the ab bins (Lab units)", "Zhang et al. 2016: grid size 10", above=0)
    grid = Setting(
        8,
        "side of the predicted ab map (cells)",
        "the paper predicts at 1/4 of the input side: 8 for 32 px",
        minimum=1,
    )
    rebalance = Setting(True, "weight each cell by the inverse smoothed bin prior (Sec. 2.2)", "Zhang et al.")
    rebalance_lambda = Setting(
        0.5,
        "mixing of a uniform into the smoothed prior",
        "Zhang et al. 2016: lambda = 1/2",
        minimum=0,
        maximum=1,
        needs="rebalance",
    )


def ab_decoder(in_dim: int, bins: int, grid: int, width: int = DECODER_WIDTH) -> nn.Sequential:
    """h (N, in_dim) -> bin logits (N, bins, grid, grid): linear map to a cell grid, 3x3 conv, 1x1 conv."""
    return nn.Sequential(
        nn.Linear(in_dim, width * grid * grid, bias=False),
        nn.Unflatten(1, (width, grid, grid)),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, bins, 1),
    )


@register(ColorizeSettings)
class Colorize(Method):
    bins: Tensor  # (Q, 2) ab centres of the in-gamut bins
    counts: Tensor  # (Q,) soft-target mass seen per bin: the empirical prior, unnormalised

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        channels = input_channels(backbone)
        if channels != 3:
            raise ConfigError(f"colorize needs colour images (3 channels); this dataset has {channels}")
        s = self.settings
        self.register_buffer("bins", ab_bins(s.bin_size).clone(), persistent=False)
        self.register_buffer("counts", torch.zeros(len(self.bins), dtype=torch.float64))
        self.decoder = ab_decoder(backbone.feature_dim, len(self.bins), s.grid)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        s = self.settings
        rgb = step.pixels(views[0].float()).clamp(0, 1)  # (N, 3, H, W)
        with torch.autocast(rgb.device.type, enabled=False):
            lab = rgb_to_lab(rgb)  # (N, 3, H, W): L in [0, 100]
        grey = (lab[:, :1] / 100).expand_as(rgb)  # (N, 3, H, W) in [0, 1]
        if step.mean is not None and step.std is not None:
            grey = (grey - step.mean) / step.std  # normalised like the views the probe will use
        h = self.backbone(grey.contiguous())  # (N, D)
        logits = self.decoder(h)  # (N, Q, g, g)
        with torch.no_grad(), torch.autocast(rgb.device.type, enabled=False):
            z = soft_encode(F.adaptive_avg_pool2d(lab[:, 1:], s.grid), self.bins, NEIGHBOURS, SIGMA)
            weights = self.cell_weights(z) if s.rebalance else None  # (N, g, g)
        loss = colorization_loss(logits, z, weights)
        return StepOutput(loss=loss, embedding=h)

    def cell_weights(self, z: Tensor) -> Tensor:
        """Rebalancing weights v (N, g, g) of soft targets z (N, Q, g, g), once z has joined the prior."""
        self.counts += z.sum(dim=(0, 2, 3)).to(self.counts)
        smoothed = smooth_prior((self.counts / self.counts.sum()).float(), self.bins, SIGMA)  # (Q,)
        w = rebalance_weights(smoothed, self.settings.rebalance_lambda)  # (Q,)
        return w[z.argmax(dim=1)]
