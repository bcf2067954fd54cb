"""SimCLR (Chen et al. 2020): a shared encoder and head, NT-Xent over the 2N views of a batch."""

from __future__ import annotations

from typing import cast

from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import nt_xent
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.methods.momentum import MomentumContrast
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class SimCLRSettings(MethodSettings):
    name = "simclr"
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations"
    multiprocess = True  # tests/test_distributed.py
    version = 2  # 2: NT-Xent in float32 under autocast

    temperature = Setting(
        0.5, "NT-Xent softmax temperature (Table 5)", "SimCLR, for batches of a few hundred", above=0
    )
    normalize = Setting(True, "l2-normalise embeddings before the similarity (Table 5 ablates it)", "SimCLR")
    momentum_encoder = Setting(
        False,
        "SimCLR v2 memory: negatives and the second view's keys from a momentum encoder",
        "SimCLR v2 Sec. 2",
    )
    queue_size = Setting(
        0, "queue of negative keys (SimCLR v2 memory); 0 = in-batch", "", minimum=0, needs="momentum_encoder"
    )
    ema = Setting(
        0.99,
        "base momentum of the momentum encoder",
        "MoCo's CIFAR value",
        minimum=0,
        maximum=1,
        needs="momentum_encoder",
    )
    ema_cosine = Setting(
        True, "raise the momentum to 1 on a cosine schedule", "BYOL", needs="momentum_encoder"
    )


@register(SimCLRSettings)
class SimCLR(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        # SimCLR v2 (Sec. 2): MoCo's memory, keys of the other view from an EMA copy, a queue of negatives
        self.contrast = (
            MomentumContrast(backbone, self.head, self.head.out_dim, s, shuffle_bn=False)
            if s.momentum_encoder
            else None
        )

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), views[:2])  # (N, d) each
        if self.contrast is not None:
            loss = self.contrast.loss(z1, z2, *cast(tuple[Tensor, Tensor], views[:2]), step.gather)
        else:
            # Negatives from the whole global batch: gather is the identity in one process.
            z1_all, z2_all = step.gather(z1), step.gather(z2)  # (M, d) each, M = global batch
            offset = step.gather.offset(len(z1))  # row of z1[0] in z1_all
            s = self.settings
            loss = nt_xent(z1, z2, s.temperature, s.normalize, z1_all, z2_all, offset)
        return StepOutput(loss=loss, embedding=z1)

    def after_step(self, step: StepContext) -> None:
        if self.contrast is not None:
            self.contrast.update(self.backbone, self.head, step.progress_after)
