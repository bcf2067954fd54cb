"""Exemplar-CNN (Dosovitskiy et al. 2014): each of a set of training images is a class of its own.

`classes` training images (all of them when the set is smaller), drawn once without replacement with a
generator seeded by the trial's seed, are surrogate classes 0, 1, ...; the transformed versions of an image,
here the trainer's two augmented views (`aug`, set to the paper's kinds of transformation), are classified
into its class by a linear classifier on h with the cross entropy. The trainer draws batches from every
training image, so the rows of images outside the set carry no label and are left out of the loss. The
map from image to class is sized by the training set (`step.num_images`) and built on first use.
The paper's rotations by up to 20 degrees have no op here, and it trains on 32 x 32 patches of larger
images taken where the gradients are strong; here the whole (small) images are the exemplars.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslab.config import TrialConfig
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.pretext_ops import exemplar_loss, surrogate_classes
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class ExemplarSettings(MethodSettings):
    name = "exemplar"
    paper = "Dosovitskiy et al. 2014, Discriminative Unsupervised Feature Learning with Exemplar CNNs"
    # The paper's transformations: translation and scaling by 0.7-1.4 (here a crop of 0.5-1 of the area,
    # resized back: zooms of 1-1.4, as a crop cannot zoom out), contrast and value (brightness) changes,
    # saturation powers and hue shifts of up to 0.1; flips are not among them but cost nothing.
    shared_defaults = {
        "aug": "crop(scale=0.5-1),flip,jitter(brightness=0.4,contrast=0.4,saturation=0.7,hue=0.1,p=1)"
    }
    ignores = ("head", "head_width", "out_dim", "head_bn")  # the classifier maps h to the surrogate classes

    classes = Setting(
        8000,
        "surrogate classes: training images made a class each (at most all of them)",
        "Dosovitskiy et al. 2014: 8000",
        minimum=1,
    )


@register(ExemplarSettings)
class Exemplar(Method):
    head: Head
    surrogate: Tensor  # (n,) class of each training image, -1 outside the surrogate set

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, 1, None, self.settings.classes, batch_norm=False
        )  # W h + b
        # Rebuilt from the seed on first use, so it is left out of checkpoints.
        self.register_buffer("surrogate", torch.zeros(0, dtype=torch.long), persistent=False)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        if self.surrogate.shape[0] != step.num_images:
            mapping = surrogate_classes(step.num_images, self.settings.classes, self.config.seed)
            self.surrogate = mapping.to(step.batch_indices.device)
        used = min(self.settings.classes, step.num_images)  # K classes: the classifier's first K rows
        target = self.surrogate[step.batch_indices]  # (N,), -1 outside the set
        n = target.shape[0]
        h = self.backbone(torch.cat(views[:2]))  # (2N, D)
        logits = self.head(h)[:, :used]  # (2N, K)
        loss = exemplar_loss(logits, torch.cat([target, target]))
        return StepOutput(loss=loss, embedding=h[:n])
