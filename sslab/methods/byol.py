"""BYOL (Grill et al. 2020): an online network predicts a slowly moving target network's projection."""

from __future__ import annotations

import torch
from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import byol_loss
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.methods.momentum import ema_update, frozen_copy, momentum_at
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class BYOLSettings(MethodSettings):
    name = "byol"
    paper = "Grill et al. 2020, Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning"
    # SGD lr 0.5, weight decay 5e-4 (TrialConfig's): BYOL's LARS recipes (trust coefficient 0.02 in CIFAR
    # ports) take ~20x smaller steps with sslab's LARS (0.001) and barely learn in a few epochs
    shared_defaults = {"out_dim": 256}  # projection q_theta / z_xi of 256 dimensions
    multiprocess = True  # tests/test_distributed_methods.py

    ema = Setting(
        0.99,
        "base target momentum tau",
        "0.996 on ImageNet; 0.99 at CIFAR scale, as solo-learn",
        minimum=0,
        maximum=1,
    )
    ema_cosine = Setting(True, "raise tau to 1 on a cosine schedule", "BYOL")
    predictor = Setting(True, "predictor MLP q_theta on the online branch", "BYOL")
    pred_width = Setting(
        512, "hidden width of the predictor", "scaled from 4096", minimum=1, needs="predictor"
    )
    pred_bn = Setting(
        True,
        "batch-norm in the predictor's hidden layer (the batch-norm ablation)",
        "BYOL",
        needs="predictor",
    )
    pred_lr_fixed = Setting(
        False,
        "keep the predictor's learning rate constant",
        "BYOL: it follows the schedule",
        needs="predictor",
    )


@register(BYOLSettings)
class BYOL(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s, d = self.settings, config.out_dim
        self.head = build_head(backbone.feature_dim, config.head, config.head_width, d, config.head_bn)  # g
        self.predictor = build_head(d, 2, s.pred_width, d, s.pred_bn) if s.predictor else None
        self.target_backbone = frozen_copy(backbone)  # f_xi
        self.target_head = frozen_copy(self.head)  # g_xi

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), [x1, x2])  # online z_theta (N, d)
        p1, p2 = concat_forward(self.predictor, [z1, z2]) if self.predictor else (z1, z2)  # q_theta(z)
        with torch.no_grad():
            t1, t2 = concat_forward(lambda x: self.target_head(self.target_backbone(x)), [x1, x2])  # z'_xi
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)  # L + L~ (eq. 2, symmetrised)
        return StepOutput(loss=loss, embedding=z1)

    def after_step(self, step: StepContext) -> None:
        tau = momentum_at(self.settings.ema, self.settings.ema_cosine, step.progress_after)
        ema_update(self.target_backbone, self.backbone, tau)  # xi <- tau xi + (1 - tau) theta
        ema_update(self.target_head, self.head, tau)

    def fixed_lr_parameters(self) -> list[torch.nn.Parameter]:
        if self.predictor is None or not self.settings.pred_lr_fixed:
            return []
        return list(self.predictor.parameters())
