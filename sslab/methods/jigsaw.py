"""Jigsaw puzzles (Noroozi & Favaro 2016): which permutation of a set shuffled the 9 tiles of an image?

The image (a random window of 3x3 cells) is cut into 9 tiles, one at a random place in each cell (the gap
and jitter that keep edges from matching across tiles), each normalised on its own; the tiles are shuffled
by one permutation of a fixed set chosen for large Hamming distances (Algorithm 1), each goes through the
backbone (shared weights, the paper's context-free network), and the features, concatenated in their
shuffled order, through fully connected layers to a classifier over the set.

Every backbone ends in an adaptive pool, so tiles of any size go in: they are upsampled by `patch_scale` (and
to at least the 8 px SmallCNN needs), as the 7 px tiles of a 28 px image train features that probe better at
twice their size; the evaluation probes the backbone on whole images. The layers after the join take their
depth, width and batch-norm from the shared head fields and end in the permutation classes, so `out_dim` is
not read; they take 9 tiles, so `probe_layers=all` has no head to probe. Only the first view is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.augment.color import to_gray
from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.pretext_ops import (
    crop_patches,
    fit_patches,
    grid_corners,
    jigsaw_geometry,
    maximal_hamming_permutations,
    normalize_patches,
)
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting

TILES = 9
PERMUTATION_SEED = 0  # the permutation set defines the task: one fixed set for every trial


class JigsawSettings(MethodSettings):
    name = "jigsaw"
    paper = "Noroozi & Favaro 2016, Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
    # The default head's 2 layers are fc7 and fc8 after the join (the paper's Fig. 3). The tile grid is the
    # crop, and the tiles are normalised one by one, so the views are only flipped. At the shared lr 0.5 the
    # classifier diverges (loss 6.1 then 7.4 over 2 epochs on 3,000 embedded images, measured; 0.1: 3.9
    # then 2.1).
    shared_defaults = {"aug": "flip", "lr": 0.1}
    ignores = ("out_dim",)  # the classifier ends in the permutation classes

    permutations = Setting(
        100,
        "size of the permutation set: the number of classes",
        "Noroozi's released model (permutations_100_max); Table 3 ablates 100 to 1000",
        minimum=2,
        maximum=2000,  # the greedy set costs O(size * 9!) to build
    )
    permutation_criterion = Setting(
        "mean",
        "greedy choice of each next permutation: mean = largest summed Hamming distance to those chosen "
        "(Algorithm 1), min = largest minimum distance",
        "Noroozi Algorithm 1",
        choices=("mean", "min"),
    )
    tile_fraction = Setting(
        0.85,
        "tile side as a fraction of its grid cell; the rest is the gap and the jitter",
        "Noroozi: 64 px tiles in 75 px cells",
        above=0,
        maximum=1,
    )
    patch_scale = Setting(
        2.0,
        "tiles are resized by this factor (bilinear, antialiased) before the backbone, to at least 8 px",
        "measured here, 3,000 embedded images x 2 epochs: probe +0.7 points over random init at 1, "
        "+3.05 at 2",
        minimum=1,
    )
    tile_normalize = Setting(
        True, "normalise each tile's mean and std on its own (removes low-level cues)", "Noroozi Sec. 3.3"
    )
    grayscale = Setting(
        0.3,
        "probability that an image's tiles are turned grey (against chromatic aberration; RGB data only)",
        "Noroozi Sec. 3.3",
        minimum=0,
        maximum=1,
    )


@register(JigsawSettings)
class Jigsaw(Method):
    classifier: Head
    permutation_set: Tensor  # (P, 9): slot k of puzzle class c shows tile permutation_set[c, k]

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        if config.head < 1:
            raise ConfigError("jigsaw: head must be >= 1 (the layers after the join end in the classifier)")
        permutations = maximal_hamming_permutations(s.permutations, PERMUTATION_SEED, s.permutation_criterion)
        # not saved with checkpoints: the settings determine it
        self.register_buffer("permutation_set", permutations.clone(), persistent=False)
        self.classifier = build_head(
            TILES * backbone.feature_dim, config.head, config.head_width, s.permutations, config.head_bn
        )

    def draw_puzzles(self, n: int, side: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Top-left corners (N, 9, 2) of each image's tiles in raster order, and its puzzle class (N,).

        The window of 3x3 cells sits at a random place; each tile at a random place in its cell. Draws use the
        global RNG (seeded by the trainer).
        """
        cell, tile = jigsaw_geometry(side, self.settings.tile_fraction)
        origin = torch.randint(side - 3 * cell + 1, (n, 2), device=device)  # (N, 2)
        shifts = torch.randint(cell - tile + 1, (n, TILES, 2), device=device)  # (N, 9, 2)
        classes = torch.randint(self.permutation_set.shape[0], (n,), device=device)  # (N,)
        return grid_corners(origin, cell, shifts), classes

    def gray_some(self, tiles: Tensor, step: StepContext) -> Tensor:
        """A `grayscale` share of the images' normalised RGB tiles (N, 9, C, t, t) turned grey."""
        n, _, c = tiles.shape[:3]
        if c != 3 or self.settings.grayscale <= 0:
            return tiles
        hit = torch.rand(n, device=tiles.device) < self.settings.grayscale  # (N,)
        pixels = step.pixels(tiles.flatten(0, 1))  # (9N, C, t, t)
        gray = to_gray(pixels).expand_as(pixels)
        if step.mean is not None and step.std is not None:
            gray = (gray - step.mean) / step.std
        return torch.where(hit[:, None, None, None, None], gray.reshape(tiles.shape), tiles)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x = views[0]  # (N, C, S, S)
        n, side = x.shape[0], min(x.shape[-2:])
        corners, targets = self.draw_puzzles(n, side, x.device)  # (N, 9, 2), (N,)
        tiles = self.gray_some(
            crop_patches(x, corners, jigsaw_geometry(side, self.settings.tile_fraction)[1]), step
        )
        if self.settings.tile_normalize:
            tiles = normalize_patches(tiles)
        order = self.permutation_set[targets]  # (N, 9): slot k gets tile order[:, k]
        shuffled = tiles[torch.arange(n, device=x.device)[:, None], order]  # (N, 9, C, t, t)
        h = self.backbone(fit_patches(shuffled.flatten(0, 1), self.settings.patch_scale))  # (9N, D)
        logits = self.classifier(h.reshape(n, -1))  # (N, P) from the 9 features in slot order
        loss = F.cross_entropy(logits.float(), targets)
        return StepOutput(loss=loss, embedding=logits)
