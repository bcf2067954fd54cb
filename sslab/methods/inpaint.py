"""Context Encoders (Pathak et al. 2016): reconstruct a hidden region of the image from its context.

The first view (normalised) gets its hidden region filled with the dataset mean (0 in normalised units);
the backbone encodes the rest to h and a decoder paints the image back from h. The L2 reconstruction loss
(eq. 1) reads only the predicted region: the hidden pixels with weight 1 and a border of `overlap_px` pixels
around them, which the encoder does see, with weight `overlap_weight` (the official code's overlapPred and
10x overlap weight, which make the prediction agree with its surroundings). The paper's adversarial term is
not implemented: this is its L2-only variant, which the paper also evaluates as features.

Masks: "center" predicts the central box whose sides are `mask_fraction` of the image's (the paper's 1/2:
a quarter of the area), hiding it less the overlap border; "random_block" (Sec. 3.3) predicts 4 boxes of
half that side at uniformly drawn places per image, possibly overlapping, so they cover at most as much.
The decoder paints the whole image from a 4 x 4 seed (three stride-2 transposed convolutions to 32 x 32,
then bilinear resizing to the view's size); the loss ignores everything outside the predicted region.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.pretext_ops import box_masks, center_box, inpaint_loss, input_channels, overlap_weights
from sslab.models import Backbone
from sslab.settings import MethodSettings, Setting

BLOCKS = 4  # random_block: boxes of half the centre's side, so together at most the centre's area
DECODER_WIDTH = 64  # channels of the decoder's last stage (x2 and x4 before): small next to the backbone


class InpaintSettings(MethodSettings):
    name = "inpaint"
    paper = "Pathak et al. 2016, Context Encoders: Feature Learning by Inpainting"
    # The official code's random crops and flips, and its optimiser: Adam without weight decay (lr 2e-4 at
    # batch 64 there, ~8e-4 at 256; 2e-3 measured here to learn more in a few epochs, while SGD at sslab's
    # 0.5 diverges on this regression loss).
    shared_defaults = {"aug": "crop(scale=0.2-1),flip", "optimizer": "adam", "lr": 0.002, "weight_decay": 0.0}
    ignores = ("head", "head_width", "out_dim", "head_bn")  # the decoder is the task head

    mask = Setting(
        "center",
        "hidden region: center (the central box) | random_block (4 random boxes of half its side)",
        "Pathak et al. 2016, Sec. 3.3",
        choices=("center", "random_block"),
    )
    mask_fraction = Setting(
        0.5,
        "side of the central box as a fraction of the image side",
        "Pathak et al.: 64 of 128 px",
        above=0,
        maximum=1,
    )
    overlap_px = Setting(
        1,
        "border of the predicted region that the encoder sees (pixels)",
        "official code: overlapPred 4 at 128 px, scaled to 32 px",
        minimum=0,
    )
    overlap_weight = Setting(
        10.0, "loss weight of that border", "official code: overlapL2Weight 10", minimum=0
    )


def pixel_decoder(in_dim: int, channels: int, width: int = DECODER_WIDTH) -> nn.Sequential:
    """h (N, in_dim) -> images (N, channels, 32, 32): a linear map to 4 x 4 cells, three up-convolutions."""
    return nn.Sequential(
        nn.Linear(in_dim, 4 * width * 16, bias=False),
        nn.Unflatten(1, (4 * width, 4, 4)),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1, bias=False),  # 8 x 8
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),  # 16 x 16
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),  # 32 x 32
    )


@register(InpaintSettings)
class Inpaint(Method):
    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.decoder = pixel_decoder(backbone.feature_dim, input_channels(backbone))

    def boxes(self, n: int, height: int, width: int, device: torch.device) -> Tensor:
        """The predicted boxes (N, K, 4) [top, left, height, width] of a batch; random ones drawn by torch."""
        s = self.settings
        top, left, box_h, box_w = center_box(height, width, s.mask_fraction)
        if s.mask == "center" and 2 * s.overlap_px >= min(box_h, box_w):
            raise ConfigError(
                f"inpaint.overlap_px={s.overlap_px} leaves nothing hidden in the {box_h}x{box_w} centre of "
                f"{height}-px images; use overlap_px < {min(box_h, box_w) / 2:g} or a larger mask_fraction"
            )
        if s.mask == "center":
            return torch.tensor([top, left, box_h, box_w], device=device).expand(n, 1, 4)
        box_h, box_w = max(1, round(box_h / 2)), max(1, round(box_w / 2))
        if 2 * s.overlap_px >= min(box_h, box_w):
            raise ConfigError(
                f"inpaint.overlap_px={s.overlap_px} leaves nothing hidden in {box_h}x{box_w} random blocks "
                f"of {height}-px images; use overlap_px < {min(box_h, box_w) / 2:g} or a larger mask_fraction"
            )
        corner = torch.rand(n, BLOCKS, 2, device=device)  # (N, K, 2)
        tops = (corner[..., 0] * (height - box_h + 1)).floor().long()
        lefts = (corner[..., 1] * (width - box_w + 1)).floor().long()
        sides = torch.tensor([box_h, box_w], device=device).expand(n, BLOCKS, 2)
        return torch.cat([tops[..., None], lefts[..., None], sides], dim=-1)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        s = self.settings
        x = views[0]  # (N, C, H, W), normalised: 0 is the dataset mean
        n, _, height, width = x.shape
        filled, predicted = box_masks(self.boxes(n, height, width, x.device), height, width, s.overlap_px)
        h = self.backbone(x.masked_fill(filled, 0.0))  # (N, D) of the context
        painted = self.decoder(h)  # (N, C, 32, 32)
        if painted.shape[-2:] != (height, width):
            painted = F.interpolate(painted, size=(height, width), mode="bilinear", align_corners=False)
        loss = inpaint_loss(painted, x, overlap_weights(filled, predicted, s.overlap_weight))
        return StepOutput(loss=loss, embedding=h)
