"""Context prediction (Doersch, Gupta & Efros 2015): where is the second patch relative to the first?

Each image gets a 3x3 grid of patches with a gap between them and a random jitter of each patch; the centre
patch and one of its 8 neighbours (drawn per image) go through the backbone (a siamese pair, shared
weights), and their features, concatenated, through fully connected layers (the paper's late fusion) to an
8-way classifier. The gap and jitter keep the network from matching edges or lines across patches; colour
dropping or projection removes the chromatic-aberration cue to a patch's place in the image (Sec. 3.1).

Every backbone ends in an adaptive pool, so patches of any size go in: they are upsampled by `patch_scale`
(and to at least the 8 px SmallCNN needs), as the 7 px patches of a 28 px image train features that probe
better at twice their size; the evaluation probes the backbone on whole images. The fusion layers take their
depth, width and batch-norm from the shared head fields and end in the 8 classes, so `out_dim` is not read;
they are the method's classifier, not a projection head `probe_layers=all` could probe (they take a pair of
patches).
Only the first view is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.pretext_ops import (
    crop_patches,
    drop_color_channels,
    fit_patches,
    grid_corners,
    project_out_green_magenta,
    relpos_geometry,
)
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting

NEIGHBOURS = 8  # classes: the neighbours of the centre cell in raster order (cells 0-3 and 5-8)


class RelPosSettings(MethodSettings):
    name = "relpos"
    paper = "Doersch, Gupta & Efros 2015, Unsupervised Visual Representation Learning by Context Prediction"
    # fc7, fc8 and the classifier after the join (the paper's Fig. 3). The patch grid is the crop, and colour
    # distortion would fight the colour counter-measure, so the views are only flipped. At the shared lr 0.5
    # the classifier diverges (loss 4.9 then 5.1 over 2 epochs on 3,000 embedded images, measured; 0.1: 1.7
    # then 1.5).
    shared_defaults = {"head": 3, "aug": "flip", "lr": 0.1}
    ignores = ("out_dim",)  # the classifier ends in the 8 positions

    # The paper's 96 px patches with 48 px gaps and up to 7 px of jitter fill a grid of about 400 px; on
    # 28 px images a 1:2 gap would leave no room for jitter, so the gap is narrowed to 2 px and the jitter
    # kept at 1 px (patches of 7 px).
    patch_fraction = Setting(
        0.25,
        "patch side as a fraction of the image side",
        "Doersch: 96 px on a ~400 px grid",
        above=0,
        maximum=1,
    )
    gap_fraction = Setting(
        0.08,
        "gap between neighbouring patches, as a fraction of the image side",
        "Doersch: 48 px (half a patch); narrowed for 28-32 px images",
        minimum=0,
        maximum=1,
    )
    jitter_fraction = Setting(
        0.04,
        "largest random shift of each patch in each direction, as a fraction of the image side",
        "Doersch: 7 px",
        minimum=0,
        maximum=1,
    )
    patch_scale = Setting(
        2.0,
        "patches are resized by this factor (bilinear, antialiased) before the backbone, to at least 8 px",
        "measured here, 3,000 embedded images x 2 epochs: probe +0.9 points over random init at 1, "
        "+1.25 at 2, +2.05 at 3",
        minimum=1,
    )
    color_drop = Setting(
        "drop",
        "chromatic-aberration counter-measure on RGB patches: drop = keep one random channel and replace the "
        "others with faint noise, project = remove the green-magenta axis, none; 1-channel data: none",
        "Doersch Sec. 3.1 (both work alike; drop is the one shown)",
        choices=("none", "drop", "project"),
    )


@register(RelPosSettings)
class RelPos(Method):
    classifier: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        if 3 * s.patch_fraction + 2 * s.gap_fraction + 2 * s.jitter_fraction > 1:
            raise ConfigError(
                "relpos: 3 * patch_fraction + 2 * gap_fraction + 2 * jitter_fraction must be <= 1 "
                "(the jittered 3x3 grid must fit in the image)"
            )
        if config.head < 1:
            raise ConfigError("relpos: head must be >= 1 (the layers after the join end in the classifier)")
        self.classifier = build_head(
            2 * backbone.feature_dim, config.head, config.head_width, NEIGHBOURS, config.head_bn
        )

    def geometry(self, side: int) -> tuple[int, int, int]:
        """(patch, gap, jitter) in pixels for images of `side` px."""
        s = self.settings
        return relpos_geometry(side, s.patch_fraction, s.gap_fraction, s.jitter_fraction)

    def draw_pairs(self, n: int, side: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Top-left corners (N, 2, 2) of each image's centre patch and a neighbour, and its class (N,).

        The grid sits at a random place where it fits; draws use the global RNG (seeded by the trainer).
        """
        patch, gap, jitter = self.geometry(side)
        span = 3 * patch + 2 * gap + 2 * jitter
        origin = torch.randint(side - span + 1, (n, 2), device=device) + jitter  # (N, 2) unjittered cell 0
        shifts = torch.randint(-jitter, jitter + 1, (n, 9, 2), device=device)  # (N, 9, 2) per patch
        corners = grid_corners(origin, patch + gap, shifts)  # (N, 9, 2)
        neighbour = torch.randint(NEIGHBOURS, (n,), device=device)  # (N,) class
        cell = neighbour + (neighbour >= 4).long()  # (N,) its grid cell, skipping the centre 4
        pair = torch.stack([corners[:, 4], corners[torch.arange(n, device=device), cell]], dim=1)
        return pair, neighbour

    def remove_color_cues(self, patches: Tensor, step: StepContext) -> Tensor:
        """The colour counter-measure on normalised patches (M, C, p, p)."""
        mode, (m, c) = self.settings.color_drop, patches.shape[:2]
        if mode == "drop" and c > 1:
            keep = torch.randint(c, (m,), device=patches.device)  # one kept channel per patch
            return drop_color_channels(patches, keep, torch.randn_like(patches))
        if mode == "project" and c == 3:  # a linear map of pixel values: undo the normalisation first
            projected = project_out_green_magenta(step.pixels(patches))
            return projected if step.mean is None or step.std is None else (projected - step.mean) / step.std
        return patches

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x = views[0]  # (N, C, S, S)
        n, side = x.shape[0], min(x.shape[-2:])
        corners, targets = self.draw_pairs(n, side, x.device)  # (N, 2, 2), (N,)
        patches = crop_patches(x, corners, self.geometry(side)[0]).flatten(0, 1)  # (2N, C, p, p) pairs
        h = self.backbone(
            fit_patches(self.remove_color_cues(patches, step), self.settings.patch_scale)
        )  # (2N, D)
        logits = self.classifier(h.reshape(n, -1))  # (N, 8) from [h(centre), h(neighbour)]
        loss = F.cross_entropy(logits.float(), targets)
        return StepOutput(loss=loss, embedding=logits)
