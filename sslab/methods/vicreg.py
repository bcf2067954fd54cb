"""VICReg (Bardes, Ponce & LeCun 2022): invariance, variance and covariance terms on two views' embeddings.

z = h(f(x)) with a 3-layer expander h (Linear-BN-ReLU twice, then Linear). The loss is
lambda s(Z, Z') + mu v + nu c: the mean squared difference between the views, a hinge keeping every
dimension's standard deviation over the batch above gamma, and the squared off-diagonal covariances / d.
The variance and covariance are taken over the global batch: under several processes the embeddings are
gathered first (`step.gather`), as the official code's FullGatherLayer does. As there, each view passes
the network separately, so batch-norm statistics are per view. The expander's last bias (the
official code has none) gets no gradient from this loss, which is blind to a shift of both views.
"""

from __future__ import annotations

from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import vicreg_loss
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class VICRegSettings(MethodSettings):
    name = "vicreg"
    paper = (
        "Bardes, Ponce & LeCun 2022, VICReg: Variance-Invariance-Covariance Regularization for "
        "Self-Supervised Learning"
    )
    multiprocess = True  # tests/test_distributed_family.py
    shared_defaults = {
        "head": 3,
        # 8192-8192-8192 in the paper (4x ResNet-50's 2048 features); 2048 is solo-learn's CIFAR width and 8x
        # the small backbone's 256 features (the paper's ablation: a wider expander keeps helping).
        "head_width": 2048,
        "out_dim": 2048,
        # The paper's LARS (trust coefficient 0.001, lr 0.2) barely moves the weights in a few hundred steps,
        # as for Barlow Twins; Adam is insensitive to the loss's scale (~25 at the start).
        "optimizer": "adam",
        # measured on 3,000 embedded images x 2 epochs: +2.6 points over random init (1e-3: +0.75; SGD at
        # lr 0.3 diverges)
        "lr": 3e-3,
        "weight_decay": 1e-6,  # the paper's
    }

    lambd = Setting(
        25.0,
        "weight lambda of the invariance term s (the paper ablates the three weights)",
        "VICReg",
        minimum=0,
    )
    mu = Setting(25.0, "weight mu of the variance term v (mu = 0: no variance term)", "VICReg", minimum=0)
    nu = Setting(1.0, "weight nu of the covariance term c (nu = 0: no covariance term)", "VICReg", minimum=0)
    gamma = Setting(1.0, "target standard deviation gamma of the variance hinge", "VICReg", above=0)
    eps = Setting(
        1e-4, "epsilon in S(x) = sqrt(Var(x) + epsilon), against a vanishing gradient", "VICReg", above=0
    )


@register(VICRegSettings)
class VICReg(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(  # the expander h
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        # Each view passes the network on its own, so batch-norm statistics are per view (the official code).
        z1 = self.head(self.backbone(views[0]))  # (N, d)
        z2 = self.head(self.backbone(views[1]))  # (N, d)
        s = self.settings
        loss = vicreg_loss(z1, z2, s.lambd, s.mu, s.nu, s.gamma, s.eps, step.gather)
        return StepOutput(loss=loss, embedding=z1)
