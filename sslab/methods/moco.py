"""MoCo v1/v2 (He et al. 2019; Chen et al. 2020): a momentum key encoder and a queue of negative keys.

`head` 1 is v1's linear output layer, `head` 2 v2's MLP head (no batch-norm, as in v2). The loss is
symmetrised over the two views, as in the MoCo comparisons of SimSiam and MoCo v3.
"""

from __future__ import annotations

from torch import Tensor

from sslab.config import TrialConfig
from sslab.methods.base import Method, StepOutput, concat_forward, register
from sslab.methods.momentum import MomentumContrast
from sslab.models import Backbone, Head, build_head


@register
class MoCo(Method):
    name = "moco"
    paper = (
        "He et al. 2019, Momentum Contrast for Unsupervised Visual Representation Learning; "
        "Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning"
    )
    defaults = {
        "temperature": 0.2,  # v2's tau
        "queue_size": 4096,  # 65536 on ImageNet; 4096 as in MoCo's CIFAR-10 demo
        "ema": 0.99,  # 0.999 on ImageNet; 0.99 for short CIFAR-scale runs (MoCo's CIFAR-10 demo)
        "ema_cosine": False,  # MoCo keeps m constant
        "head_bn": False,  # v2's MLP head is fc-ReLU-fc
        "lr": 0.3,  # ImageNet 0.03 (200 epochs) learns too slowly in a few epochs; 0.3 as for CIFAR
    }

    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        self.contrast = MomentumContrast(backbone, self.head, self.head.out_dim, config, shuffle_bn=True)

    def forward(self, views: list[Tensor], labels: Tensor) -> StepOutput:
        x1, x2 = views[:2]
        q1, q2 = concat_forward(lambda x: self.head(self.backbone(x)), [x1, x2])  # queries (N, D) each
        loss = self.contrast.loss(q1, q2, x1, x2, self.gather)  # keys from the momentum encoder, enqueued
        return StepOutput(loss=loss, embedding=q1)

    def after_step(self, progress: float) -> None:
        self.contrast.update(self.backbone, self.head, progress)
