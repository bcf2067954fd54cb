"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity.

z_A = g(f(y_A)), z_B = g(f(y_B)) with a wide 3-layer projector g (Linear-BN-ReLU twice, then Linear); the
loss standardises each dimension over the batch, C = z_A^T z_B / N (D, D), and sums
(1 - C_ii)^2 + lambda * C_ij^2 (i != j). As in the paper's code, each view passes the network separately,
so batch-norm statistics are per view. Across processes the standardisation and C cover the global batch
(the official code's synchronised batch-norm and all-reduce of C); --sync-bn synchronises the projector's.
"""

from __future__ import annotations

from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import barlow_twins
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class BarlowTwinsSettings(MethodSettings):
    name = "barlow"
    paper = "Zbontar et al. 2021, Barlow Twins: Self-Supervised Learning via Redundancy Reduction"
    multiprocess = True  # tests/test_distributed_methods.py
    version = 2  # 2: the cross-correlation in float32 under autocast
    shared_defaults = {
        "head": 3,
        # 8192-8192-8192 in the paper (4x ResNet-50's 2048 features); 2048 is solo-learn's CIFAR width and
        # 8x the small backbone's 256 features (the paper's Fig. 4: wider keeps helping).
        "head_width": 2048,
        "out_dim": 2048,
        # The paper's LARS (trust coefficient 0.001, lr 0.2) changes each weight by ~0.02% a step: far too
        # slow for a few hundred steps. Adam is insensitive to the loss's scale (~D at the start).
        "optimizer": "adam",
        "lr": 3e-3,  # measured on 3,000 embedded images x 2 epochs: +3.4 points over random init (1e-3: -1.2)
        "weight_decay": 1.5e-6,  # the paper's
    }

    lambd = Setting(
        0.0051, "weight lambda of the off-diagonal (redundancy reduction) term", "Barlow Twins", minimum=0
    )


@register(BarlowTwinsSettings)
class BarlowTwins(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        z_a = self.head(self.backbone(views[0]))  # (N, D)
        z_b = self.head(self.backbone(views[1]))  # (N, D)
        loss = barlow_twins(z_a, z_b, self.settings.lambd, processes=step.gather)  # C of the global batch
        return StepOutput(loss=loss, embedding=z_a)
