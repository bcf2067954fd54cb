"""NNCLR (Dwibedi et al. 2021): the nearest neighbour from a support set replaces each embedding as positive.

z = g(f(x)) (3-layer projection MLP), p = q(z) (2-layer prediction MLP). The support set Q is a queue of
l2-normalised first-view embeddings; NN(z, Q) is the queue entry nearest to z, a constant. The loss is
L(NN(z1), p2) / 2 + L(NN(z2), p1) / 2 with L the NT-Xent of `nnclr_loss` (Algorithm 1), the other
predictions of the global batch as negatives. After the step the gathered z1 of the global batch is
enqueued, so the queue is the same in every process. On the very first step the queue is still empty and
each embedding is its own neighbour (a SimCLR step); later lookups see only entries already written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.losses import nnclr_loss, nnclr_nearest_neighbour
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class NNCLRSettings(MethodSettings):
    name = "nnclr"
    paper = (
        "Dwibedi et al. 2021, With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of "
        "Visual Representations"
    )
    multiprocess = True  # tests/test_distributed_family.py
    # SGD at TrialConfig's lr 0.5 rather than the paper's LARS: measured on 3,000 embedded images x 2 epochs,
    # +3.5 points over random init (lr 1.0: +1.8).
    shared_defaults = {
        "head": 3,  # projection MLP 2048-2048-d, batch-norm on every layer (the paper, solo-learn)
        "head_width": 2048,
        "out_dim": 256,  # d = 256
    }

    temperature = Setting(0.1, "NT-Xent temperature tau", "NNCLR", above=0)
    # 98,304 in the paper, for ImageNet's 1.28M images (its ablation: larger helps); 8,192 holds more than
    # an epoch of a 3,000-image CPU run and costs a (batch x 8,192) product per view per step.
    queue_size = Setting(8192, "support set size |Q| (the paper ablates it)", "scaled from 98,304", minimum=1)
    predictor = Setting(True, "prediction MLP q on both views (the paper ablates it)", "NNCLR")
    pred_width = Setting(
        1024, "hidden width of the prediction MLP", "scaled from 4096", minimum=1, needs="predictor"
    )


@register(NNCLRSettings)
class NNCLR(Method):
    head: Head
    queue: Tensor  # (|Q|, d) support set, l2-normalised
    queue_next: Tensor  # () row the next entry is written to
    queue_filled: Tensor  # () rows written so far (at most |Q|)

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s, d = self.settings, config.out_dim
        self.head = build_head(  # projection g, batch-norm on its output too
            backbone.feature_dim, config.head, config.head_width, d, config.head_bn, last_bn=config.head_bn
        )
        self.predictor: nn.Module | None = build_head(d, 2, s.pred_width, d) if s.predictor else None
        self.register_buffer("queue", torch.zeros(s.queue_size, self.head.out_dim))
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: Tensor | None = None

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        z1, z2 = concat_forward(lambda x: self.head(self.backbone(x)), views[:2])  # (N, d) each
        p1, p2 = concat_forward(self.predictor, [z1, z2]) if self.predictor else (z1, z2)  # q(z)
        nn1, nn2 = self.neighbours(z1), self.neighbours(z2)  # NN(z, Q), (N, d) constants
        p1_all, p2_all = step.gather(p1), step.gather(p2)  # (M, d): the global batch's predictions
        offset = step.gather.offset(len(p1))
        t = self.settings.temperature
        loss = nnclr_loss(nn1, p2, t, p2_all, offset) / 2 + nnclr_loss(nn2, p1, t, p1_all, offset) / 2
        self._pending = step.gather(
            F.normalize(z1.detach().float(), dim=1)
        )  # (M, d), enqueued after the step
        return StepOutput(loss=loss, embedding=z1)

    def neighbours(self, z: Tensor) -> Tensor:
        """NN(z, Q) over the entries written so far; z itself (normalised) while the queue is empty."""
        filled = int(self.queue_filled)
        if filled == 0:
            return F.normalize(z.detach().float(), dim=1)
        return nnclr_nearest_neighbour(z, self.queue[:filled])

    @torch.no_grad()
    def after_step(self, step: StepContext) -> None:
        if self._pending is None:
            return
        z = self._pending[-len(self.queue) :]  # a batch larger than the queue keeps its last rows
        rows = (int(self.queue_next) + torch.arange(len(z), device=z.device)) % len(self.queue)
        self.queue[rows] = z.to(self.queue.dtype)
        self.queue_next.copy_((self.queue_next + len(z)) % len(self.queue))
        self.queue_filled.copy_(torch.clamp(self.queue_filled + len(z), max=len(self.queue)))
        self._pending = None
