"""Plain distillation without labels (S2-BNN, Shen et al. 2021; SimCLRv2's distillation, Chen et al. 2020b).

SimCLRv2 distils a fine-tuned teacher's class probabilities into a student on unlabelled images; S2-BNN does
it before any label is seen, on the projection head's output: the student's l2-normalised head output,
divided by tau and passed through a softmax over its D dimensions, matches the frozen teacher's in KL
divergence (`sslab.losses.distillation_kl`). The student is the trial's backbone and head, built as SimCLR's,
and its output dimension must be the teacher's. As in S2-BNN's code, student and teacher see the same view;
both global views are used, as 2N images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import distillation_kl
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.teacher import check_dimensions, load_teacher
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class DistillSettings(MethodSettings):
    name = "distill"
    paper = (
        "Shen et al. 2021, S2-BNN: Bridging the Gap Between Self-Supervised Real and 1-bit Neural Networks "
        "via Guided Distribution Calibration (distillation only)"
    )

    teacher = Setting(
        "",
        "the frozen teacher's pretraining hash; sslab run and sslab study run also take a finished trial's "
        "id, config hash or STUDY:axis=value cell and store its pretraining hash",
        "",
    )
    temperature = Setting(
        0.2,
        "tau of the student's and the teacher's softmax over the output dimensions",
        "S2-BNN's code (--moco-t 0.2 in its README)",
        above=0,
    )


@register(DistillSettings)
class Distill(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        self.teacher = load_teacher(self.name, self.settings.teacher)
        check_dimensions(self.name, self.head.out_dim, self.teacher)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x = torch.cat(views[:2])  # (2N, C, H, W): each view is an image of its own
        z_s = self.head(self.backbone(x))  # (2N, D)
        z_t = self.teacher(x, step)  # (2N, D), no gradient
        loss = distillation_kl(z_s, z_t, self.settings.temperature)
        return StepOutput(loss=loss, embedding=z_s[: len(views[0])])
