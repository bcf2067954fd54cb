"""SimCLR (Chen et al. 2020): a shared encoder and head, NT-Xent over the 2N views of a batch."""

from __future__ import annotations

from typing import cast

from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import nt_xent
from sslab.methods.base import Method, StepOutput, concat_forward, register
from sslab.methods.momentum import MomentumContrast
from sslab.models import Backbone, Head, build_head


@register
class SimCLR(Method):
    name = "simclr"
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations"

    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        # SimCLR v2 (Sec. 2): MoCo's memory, keys of the other view from an EMA copy, a queue of negatives
        self.contrast = (
            MomentumContrast(backbone, self.head, self.head.out_dim, config, shuffle_bn=False)
            if config.momentum_encoder
            else None
        )

    def forward(self, views: list[Tensor], labels: Tensor) -> StepOutput:
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), views[:2])  # (N, d) each
        if self.contrast is not None:
            loss = self.contrast.loss(z1, z2, *cast(tuple[Tensor, Tensor], views[:2]), self.gather)
        else:
            # Negatives from the whole global batch: gather is the identity in one process.
            z1_all, z2_all = self.gather(z1), self.gather(z2)  # (M, d) each, M = global batch
            offset = self.gather.offset(len(z1))  # row of z1[0] in z1_all
            loss = nt_xent(z1, z2, self.config.temperature, self.config.normalize, z1_all, z2_all, offset)
        return StepOutput(loss=loss, embedding=z1)

    def after_step(self, progress: float) -> None:
        if self.contrast is not None:
            self.contrast.update(self.backbone, self.head, progress)
