"""RotNet (Gidaris, Singh & Komodakis 2018): predict which rotation (0/90/180/270 degrees) an image shows.

Each image of the batch is fed in all its rotations (the paper found that better than one random rotation per
image) and a 4-way cross-entropy is taken over the classifier's scores. The classifier is a linear layer on
the shared projection head g, so `probe_layers=all` probes h against g(h) as for SimCLR (whose Table 3
reports 67.6 at h and 25.6 at g(h) for a head trained on rotation prediction). Only the first view is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.pretext_ops import rotate_quarter_turns
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class RotationSettings(MethodSettings):
    name = "rotation"
    paper = (
        "Gidaris, Singh & Komodakis 2018, Unsupervised Representation Learning by Predicting Image Rotations"
    )
    # RotNet's CIFAR code trains on random crops and horizontal flips only: no colour distortion, which the
    # rotation task does not need and which hides the orientation cues it learns from. Its lr 0.1 for 128
    # images (x 4 rotations) is 0.2 for 256; at the shared 0.5 the loss can diverge (seed 1 on 3,000 embedded
    # images: 1.8 then 4.5 over 2 epochs, measured; 0.2: 1.2 then 1.0).
    shared_defaults = {"aug": "crop(scale=0.5-1),flip", "lr": 0.2}

    rotations = Setting(
        4,
        "rotation classes: 4 = 0/90/180/270 degrees, 2 = 0/180 (the paper ablates 2, 4 and 8)",
        "RotNet: 4 is best",
        minimum=2,
        maximum=4,
    )
    all_rotations_per_image = Setting(
        True,
        "feed every image in all its rotations (else one random rotation per image)",
        "RotNet: all rotations of an image in the same batch train better",
    )


@register(RotationSettings)
class Rotation(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        if self.settings.rotations not in (2, 4):
            raise ConfigError(f"rotation.rotations must be 2 or 4 (got {self.settings.rotations})")
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        self.classifier = nn.Linear(self.head.out_dim, self.settings.rotations)

    def draw_rotations(self, n: int, device: torch.device) -> Tensor:
        """Rotation classes (M,) for a batch of n images: M = n * rotations (all of them) or n (one each)."""
        k = self.settings.rotations
        if self.settings.all_rotations_per_image:
            return torch.arange(k, device=device).repeat_interleave(n)  # image i as rows i, n + i, ...
        return torch.randint(k, (n,), device=device)  # global RNG, seeded by the trainer

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x = views[0]  # (N, C, H, W)
        targets = self.draw_rotations(x.shape[0], x.device)  # (M,) rotation classes
        images = x.repeat(targets.shape[0] // x.shape[0], 1, 1, 1)  # (M, C, H, W)
        turns = targets * (4 // self.settings.rotations)  # class -> quarter turns: 2 classes are 0 and 180
        z = self.head(self.backbone(rotate_quarter_turns(images, turns)))  # g(h) (M, d)
        logits = self.classifier(z)  # (M, rotations)
        loss = F.cross_entropy(logits.float(), targets)
        return StepOutput(loss=loss, embedding=z)
