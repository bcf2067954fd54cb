"""SimCLR (Chen et al. 2020): a shared encoder and head, NT-Xent over the 2N views of a batch."""

from __future__ import annotations

from torch import Tensor

from sslab.losses import nt_xent
from sslab.methods.base import Method, StepOutput, concat_forward, register
from sslab.models import build_head


@register
class SimCLR(Method):
    name = "simclr"
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations"

    def __init__(self, config, backbone, num_classes):  # type: ignore[no-untyped-def]
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )

    def forward(self, views: list[Tensor], labels: Tensor) -> StepOutput:
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), views[:2])  # (N, d) each
        loss = nt_xent(z1, z2, self.config.temperature, self.config.normalize)
        return StepOutput(loss=loss, embedding=z1)
