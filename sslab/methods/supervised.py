"""Supervised baseline: cross-entropy on the labels through a linear classifier on the backbone.

The reference SSL results are read against (SimCLR, Chen et al. 2020, Table 1 and Fig. 5 compare colour
distortion strength and model size for SimCLR and supervised training). It trains on the same augmented
views as the self-supervised methods: both global views are labelled samples, so a step sees as many
images as an SSL step. `head`, `head_width` and `out_dim` do not apply: the classifier maps the features
h to the number of classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.config import TrialConfig
from sslab.methods.base import Method, StepOutput, register
from sslab.models import Backbone, Head, build_head


@register
class Supervised(Method):
    name = "supervised"
    paper = "Supervised cross-entropy baseline (as in Chen et al. 2020, Table 1)"
    defaults = {"head": 1}

    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(backbone.feature_dim, 1, None, num_classes, batch_norm=False)  # W h + b

    def forward(self, views: list[Tensor], labels: Tensor) -> StepOutput:
        logits = self.head(self.backbone(torch.cat(views[:2])))  # (2N, C)
        loss = F.cross_entropy(logits.float(), torch.cat([labels, labels]))
        return StepOutput(loss=loss, embedding=logits[: labels.shape[0]])
