"""MoCo v1/v2 (He et al. 2019; Chen et al. 2020): a momentum key encoder and a queue of negative keys.

`head` 1 is v1's linear output layer, `head` 2 v2's MLP head (no batch-norm, as in v2). The loss is
symmetrised over the two views, as in the MoCo comparisons of SimSiam and MoCo v3. Across processes the
keys of the global batch are enqueued (or are the negatives), and with --sync-bn the key encoder's
shuffling-BN sub-batches, joined over processes, keep one process's size.
"""

from __future__ import annotations

from torch import Tensor

from sslab.config import TrialConfig
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.methods.momentum import MomentumContrast
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class MoCoSettings(MethodSettings):
    name = "moco"
    paper = (
        "He et al. 2019, Momentum Contrast for Unsupervised Visual Representation Learning; "
        "Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning"
    )
    shared_defaults = {
        "head_bn": False,  # v2's MLP head is fc-ReLU-fc
        "lr": 0.3,  # ImageNet 0.03 (200 epochs) learns too slowly in a few epochs; 0.3 as for CIFAR
    }
    multiprocess = True  # tests/test_distributed_methods.py
    version = 2  # 2: InfoNCE logits in float32 under autocast

    temperature = Setting(0.2, "InfoNCE temperature tau", "MoCo v2", above=0)
    queue_size = Setting(
        4096,
        "queue of negative keys K; 0 = the batch's other keys",
        "MoCo's CIFAR-10 demo (65536 on ImageNet)",
        minimum=0,
    )
    ema = Setting(
        0.99,
        "momentum m of the key encoder",
        "MoCo's CIFAR-10 demo (0.999 on ImageNet)",
        minimum=0,
        maximum=1,
    )
    ema_cosine = Setting(False, "raise m to 1 on a cosine schedule (MoCo keeps it constant)", "MoCo")


@register(MoCoSettings)
class MoCo(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        self.contrast = MomentumContrast(
            backbone, self.head, self.head.out_dim, s, shuffle_bn=True, sync_bn=config.sync_bn
        )

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x1, x2 = views[:2]
        q1, q2 = concat_forward(lambda x: self.head(self.backbone(x)), [x1, x2])  # queries (N, D) each
        loss = self.contrast.loss(q1, q2, x1, x2, step.gather)  # keys from the momentum encoder, enqueued
        return StepOutput(loss=loss, embedding=q1)

    def after_step(self, step: StepContext) -> None:
        self.contrast.update(self.backbone, self.head, step.progress_after)
