"""MoCo v3 (Chen, Xie & He 2021): MoCo without a queue, keys of the batch from a momentum encoder.

Follows Algorithm 1: q = pred(proj(f_q(x))), k = proj(f_k(x)), ctr(q1, k2) + ctr(q2, k1), each InfoNCE
scaled by 2T, and the momentum m raised from its base to 1 on a cosine schedule.

Heads as in its `moco/builder.py`: MLPs of Linear -> BN -> ReLU hidden layers, the projector ending in a
BN without affine parameters (`head_bn`). MoCo_ViT's projector has 3 layers (`head = 3`, which ViT trials
set, as studies/mocov3-vit-stability.toml does) and its predictor 2, ending in BN; MoCo_ResNet's projector
has 2 (`head`'s default) and its predictor ends without BN (`pred_out_bn = auto` follows the backbone).
On a ViT, `freeze_patch_embed` keeps the random patch projection fixed (its --stop-grad-conv1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.losses import info_nce
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.methods.momentum import ema_update, frozen_copy, momentum_at
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class MoCoV3Settings(MethodSettings):
    name = "mocov3"
    paper = "Chen, Xie & He 2021, An Empirical Study of Training Self-Supervised Vision Transformers"
    # 2-layer projector (its ResNet code): TrialConfig's head (a default of 3, its ViT code's, would change
    # every CNN trial); SGD lr 0.5 instead of LARS, which at batch 256 barely learns in a few epochs (see
    # byol.py). Its ViT recipe: head = 3, AdamW lr 1.5e-4 per 256 images, weight decay 0.1.
    shared_defaults = {"out_dim": 256}
    multiprocess = True  # tests/test_distributed_methods.py
    # 2: InfoNCE logits in float32 under autocast; 3: on a CNN the predictor ends without BN (MoCo_ResNet)
    version = 3

    temperature = Setting(
        0.2, "InfoNCE temperature T", "its ViT value (1.0 goes with batch 4096 for ResNets)", above=0
    )
    ema = Setting(0.99, "base momentum m, raised to 1 on a cosine", "MoCo v3", minimum=0, maximum=1)
    ema_cosine = Setting(True, "raise m to 1 on a cosine schedule", "MoCo v3")
    predictor = Setting(True, "predictor MLP on the query branch", "MoCo v3")
    pred_width = Setting(
        512, "hidden width of the predictor", "scaled from 4096", minimum=1, needs="predictor"
    )
    pred_bn = Setting(True, "batch-norm in the predictor's hidden layer", "MoCo v3", needs="predictor")
    pred_out_bn = Setting(
        "auto",
        "batch-norm on the predictor's output (auto: on a ViT, not on a CNN; needs pred_bn)",
        "MoCo v3: its MoCo_ViT predictor ends in BN, its MoCo_ResNet one does not",
        choices=("auto", "on", "off"),
        needs="predictor",
        earlier=((3, "on"),),
    )
    pred_lr_fixed = Setting(
        False,
        "keep the predictor's learning rate constant",
        "MoCo v3: it follows the schedule",
        needs="predictor",
    )
    freeze_patch_embed = Setting(
        False,
        "keep the ViT's random patch projection fixed",
        "MoCo v3 Sec. 4.2; its ViT recipes set --stop-grad-conv1 (off here: the default backbone is a CNN)",
    )


@register(MoCoV3Settings)
class MoCoV3(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        if s.freeze_patch_embed:  # a random, fixed patch projection (MoCo v3 Sec. 4.2)
            freeze = getattr(backbone, "freeze_patch_embedding", None)
            if freeze is None:
                raise ConfigError(f"mocov3.freeze_patch_embed needs a ViT backbone (got {config.backbone})")
            freeze()
        d, bn = config.out_dim, config.head_bn
        self.head = build_head(backbone.feature_dim, config.head, config.head_width, d, bn, last_bn=bn)
        vit = config.backbone.startswith("vit_")
        out_bn = s.pred_bn and (s.pred_out_bn == "on" or (s.pred_out_bn == "auto" and vit))
        self.predictor = (  # MoCo_ResNet's predictor ends in a Linear without bias
            build_head(d, 2, s.pred_width, d, s.pred_bn, last_bn=out_bn, last_bias=out_bn)
            if s.predictor
            else None
        )
        self.momentum_backbone = frozen_copy(backbone)  # f_k
        self.momentum_head = frozen_copy(self.head)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), [x1, x2])  # (N, d) each
        q1, q2 = concat_forward(self.predictor, [z1, z2]) if self.predictor else (z1, z2)  # queries
        with torch.no_grad():
            k1, k2 = concat_forward(lambda x: self.momentum_head(self.momentum_backbone(x)), [x1, x2])  # keys
        k1, k2 = step.gather(k1), step.gather(k2)  # keys of the global batch (M, d)
        t, offset = self.settings.temperature, step.gather.offset(len(q1))  # q1[0]'s positive: row offset
        loss = 2 * t * (info_nce(q1, k2, None, t, offset) + info_nce(q2, k1, None, t, offset))  # ctr + ctr
        return StepOutput(loss=loss, embedding=z1)

    def after_step(self, step: StepContext) -> None:
        m = momentum_at(self.settings.ema, self.settings.ema_cosine, step.progress_after)
        ema_update(self.momentum_backbone, self.backbone, m)  # f_k = m f_k + (1 - m) f_q
        ema_update(self.momentum_head, self.head, m)

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        if self.predictor is None or not self.settings.pred_lr_fixed:
            return []
        return list(self.predictor.parameters())
