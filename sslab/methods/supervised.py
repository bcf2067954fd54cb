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
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings


class SupervisedSettings(MethodSettings):
    name = "supervised"
    paper = "Supervised cross-entropy baseline (as in Chen et al. 2020, Table 1)"
    ignores = ("head", "head_width", "out_dim", "head_bn")  # the classifier maps h to the classes
    multiprocess = True  # tests/test_distributed_methods.py
    uses_labels = True


@register(SupervisedSettings)
class Supervised(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(backbone.feature_dim, 1, None, num_classes, batch_norm=False)  # W h + b

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        logits = self.head(self.backbone(torch.cat(views[:2])))  # (2N, C)
        loss = F.cross_entropy(logits.float(), torch.cat([labels, labels]))
        return StepOutput(loss=loss, embedding=logits[: labels.shape[0]])
