"""Invariant and Spreading Instance Feature (Ye, Zhang, Yuen & Chang 2019): instance softmax, in-batch.

One siamese encoder maps an image x_i and its augmentation x^_i to l2-normalised 128-d features f_i, f^_i
(a linear layer after the backbone, as in the paper). The batch's original-image features f_k are the
classifier weights: P(i | x^_i) = exp(f_i . f^_i / tau) / sum_k exp(f_k . f^_i / tau) is made large
(invariance) and P(i | x_j), j != i, small (spreading), J = -sum_i log P(i | x^_i) - sum_i sum_{j != i}
log(1 - P(i | x_j)) (eq. 8). The first view plays the original x_i, the second the augmentation x^_i; the
official code augments both (as the default `aug` here does), `aug1=identity` gives the paper's
un-augmented originals. Under several processes the originals of the whole global batch are the instances.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import invaspread_loss
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class InvaSpreadSettings(MethodSettings):
    name = "invaspread"
    paper = (
        "Ye, Zhang, Yuen & Chang 2019, Unsupervised Embedding Learning via Invariant and Spreading Instance "
        "Feature"
    )
    multiprocess = True  # tests/test_distributed_family.py
    # One linear layer to the 128-d embedding (out_dim's default), as the paper. The learning rate stays
    # TrialConfig's 0.5: measured on 3,000 embedded images x 2 epochs, +3.85 points over random init, against
    # +1.55 at the official 0.03 for batch 128 (0.06 for sslab's batch 256), too slow for a short run.
    shared_defaults = {"head": 1}

    temperature = Setting(0.1, "softmax temperature tau", "InvaSpread (Sec. 4, the official code)", above=0)


@register(InvaSpreadSettings)
class InvaSpread(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        # both views through the network as one batch, as the official code concatenates them
        f, f_hat = concat_forward(lambda x: F.normalize(self.head(self.backbone(x)), dim=1), views[:2])
        f_all = step.gather(f)  # (M, d): the global batch's originals, the instances
        loss = invaspread_loss(f, f_hat, self.settings.temperature, f_all, step.gather.offset(len(f)))
        return StepOutput(loss=loss, embedding=f)
