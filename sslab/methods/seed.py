"""SEED (Fang et al. 2021): a small student learns the similarity distribution of a frozen teacher.

The student is the trial's backbone and projection head, built as SimCLR's, so that a SEED student and a
SimCLR trial of the same backbone differ only in what they learn from. Each image is embedded by the student
(z^S) and by the teacher (z^T), and scored against the teacher's own embedding and a FIFO queue of earlier
teacher embeddings; the student's softmax over those scores at tau_S is pulled towards the teacher's at
tau_T (`sslab.losses.seed_loss`). As in the official code, student and teacher see the same view; both
global views are used, as 2N images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sslab.config import TrialConfig
from sslab.losses import seed_loss
from sslab.methods.base import Method, StepContext, StepOutput, register
from sslab.methods.momentum import KeyQueue
from sslab.methods.teacher import check_dimensions, load_teacher
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class SEEDSettings(MethodSettings):
    name = "seed"
    paper = "Fang et al. 2021, SEED: Self-supervised Distillation for Visual Representation"

    teacher = Setting(
        "",
        "the frozen teacher's pretraining hash; sslab run and sslab study run also take a finished trial's "
        "id, config hash or STUDY:axis=value cell and store its pretraining hash",
        "",
    )
    temperature = Setting(0.2, "student temperature tau_S", "SEED's code (--temp 0.2)", above=0)
    teacher_temperature = Setting(
        1e-4,
        "teacher temperature tau_T (this small, p^T is nearly one-hot on the teacher's own embedding)",
        "SEED's code (--distill-t 1e-4)",
        above=0,
    )
    queue_size = Setting(
        4096,
        "queue of the teacher's embeddings K",
        "65,536 in the paper, 5% of ImageNet's 1.28M images; 4096 (MoCo's CIFAR-10 demo) holds 20% of a "
        "20,000-image CIFAR-10 subset; a frozen teacher's entries never go stale",
        minimum=1,
    )


@register(SEEDSettings)
class SEED(Method):
    head: Head
    queue: KeyQueue

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        self.teacher = load_teacher(self.name, self.settings.teacher)
        check_dimensions(self.name, self.head.out_dim, self.teacher)
        self.queue = KeyQueue(self.settings.queue_size, self.head.out_dim)

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        x = torch.cat(views[:2])  # (2N, C, H, W): each view is an image of its own
        z_s = self.head(self.backbone(x))  # (2N, D)
        z_t = self.teacher(x, step)  # (2N, D), no gradient
        s = self.settings
        loss = seed_loss(z_s, z_t, self.queue.keys, s.temperature, s.teacher_temperature)
        self.queue.enqueue(step.gather(z_t))  # every process keeps the same queue
        return StepOutput(loss=loss, embedding=z_s[: len(views[0])])
