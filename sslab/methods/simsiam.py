"""SimSiam (Chen & He 2021): a Siamese network with a predictor and a stop-gradient, no negatives."""

from __future__ import annotations

from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.losses import negative_cosine
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class SimSiamSettings(MethodSettings):
    name = "simsiam"
    paper = "Chen & He 2021, Exploring Simple Siamese Representation Learning"
    # 2-layer projector (the paper's CIFAR setting), batch-norm on its output too; SGD, momentum 0.9, lr
    # (x batch/256) 0.5, the CIFAR value of solo-learn, not the paper's ImageNet 0.05, which learns too
    # little in a few epochs
    shared_defaults = {"out_dim": 512}  # 2048 in the paper, scaled down for small backbones and CPU runs
    multiprocess = True  # tests/test_distributed_methods.py

    stop_gradient = Setting(True, "stop-gradient on the target branch (the paper's key ablation)", "SimSiam")
    predictor = Setting(True, "predictor MLP h on both branches", "SimSiam")
    pred_width = Setting(
        128, "the predictor's bottleneck width", "out_dim / 4, as 512 for 2048", minimum=1, needs="predictor"
    )
    pred_bn = Setting(True, "batch-norm in the predictor's hidden layer", "SimSiam", needs="predictor")
    pred_lr_fixed = Setting(
        True, "keep the predictor's learning rate constant (Table 1)", "SimSiam", needs="predictor"
    )


@register(SimSiamSettings)
class SimSiam(Method):
    head: Head

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s, d = self.settings, config.out_dim
        self.head = build_head(  # projection MLP, output layer followed by batch-norm without affine
            backbone.feature_dim, config.head, config.head_width, d, config.head_bn, last_bn=config.head_bn
        )
        self.predictor = build_head(d, 2, s.pred_width, d, s.pred_bn) if s.predictor else None

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), [x1, x2])  # projections (N, d)
        p1, p2 = concat_forward(self.predictor, [z1, z2]) if self.predictor else (z1, z2)  # predictions
        sg = self.settings.stop_gradient
        loss = negative_cosine(p1, z2, sg) / 2 + negative_cosine(p2, z1, sg) / 2  # D(p1, z2)/2 + D(p2, z1)/2
        return StepOutput(loss=loss, embedding=z1)

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        if self.predictor is None or not self.settings.pred_lr_fixed:
            return []
        return list(self.predictor.parameters())
