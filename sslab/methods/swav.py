"""SwAV (Caron et al. 2020): swap the prediction of Sinkhorn-Knopp cluster codes between crops.

Every crop x_t (two global, then local ones) gives z_t = normalize(g(f(x_t))) and prototype scores
z_t . C (K per crop). The codes q_s of the global crops come from Sinkhorn-Knopp on those scores (equal
partition of the batch over the K prototypes); the loss asks each other crop's scores to predict them.
The prototypes C are l2-normalised after every step and not updated during the first `freeze_fraction` of
the steps (or `freeze_prototypes` epochs). With `queue_size` > 0, each global crop keeps a queue of its past
features z; once full it is appended to the batch when computing the codes (for small batches, Caron et al.
Sec. 4.1). The paper starts filling the queue after some epochs (15 of 800, 50 of 1000 for CIFAR in
solo-learn); here it is filled from the first step and used once full, since short runs leave no epochs to
wait.
Across processes the codes are those of the global batch: every process keeps the whole queue (of the
global batch's features) and gives Sinkhorn-Knopp its own 1/W of the queue's rows with its share of the
batch, while the sums run over all processes (SwAV's distributed_sinkhorn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.losses import full_precision, sinkhorn, swav_loss
from sslab.methods.base import Gather, Method, StepContext, StepOutput, concat_forward, register
from sslab.models import Backbone, Head, build_head
from sslab.settings import MethodSettings, Setting


class SwAVSettings(MethodSettings):
    name = "swav"
    paper = "Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
    multicrop = True
    multiprocess = True  # tests/test_distributed_methods.py
    # 2: prototype scores in float32 under autocast; 3: prototypes frozen for 1% of training, not 1 epoch
    version = 3
    shared_defaults = {
        # 2x224 + 6x96 in the paper; two 3/7-size local crops add ~40% to a step of two global views.
        "local_crops": 2,
        "local_scale": "0.05-0.2",  # the paper's locals end where the global crops start (ours: 0.2)
    }

    # K = 3000 is for ImageNet's 1000 classes; CIFAR-10 benchmarks use 512 (lightly) to 3000 (solo-learn).
    # With a 10-class dataset and 256 images per step, 512 keeps every batch spread over many prototypes.
    prototypes = Setting(512, "number of prototypes K", "lightly's CIFAR-10 value", minimum=1)
    temperature = Setting(0.1, "softmax temperature of the swapped prediction", "SwAV", above=0)
    sinkhorn_eps = Setting(
        0.05, "entropy regularisation epsilon of the Sinkhorn-Knopp codes", "SwAV", above=0
    )
    sinkhorn_iters = Setting(3, "Sinkhorn-Knopp iterations", "SwAV", minimum=1)
    # SwAV freezes them for its first epoch of 100-800 (313 iterations at batch 4096 in its code): at most
    # 1% of training. An epoch of a 4-epoch run would be 25%, so the default is the fraction.
    freeze_fraction = Setting(
        0.01,
        "fraction of the training steps during which the prototypes are not updated",
        "SwAV (its first epoch of 100+)",
        minimum=0,
        maximum=1,
        earlier=((3, 0.0),),
    )
    freeze_prototypes = Setting(
        0.0,
        "epochs during which the prototypes are not updated (as well as freeze_fraction)",
        "SwAV's unit; 1 epoch of 100+ there",
        minimum=0,
        earlier=((3, 1.0),),
    )
    queue_size = Setting(
        0,
        "queue of past features per global crop, joined to the batch for the codes",
        "SwAV Sec. 4.1",
        minimum=0,
    )


@register(SwAVSettings)
class SwAV(Method):
    head: Head
    queue_filled: Tensor  # () rows of the queue written, registered with the queue

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        self.head = build_head(
            backbone.feature_dim, config.head, config.head_width, config.out_dim, config.head_bn
        )
        d = self.head.out_dim
        self.prototypes = nn.Parameter(F.normalize(torch.randn(s.prototypes, d), dim=1))  # C (K, D)
        self.queue: Tensor | None
        if s.queue_size > 0:
            self.register_buffer("queue", torch.zeros(2, s.queue_size, d))  # past z of crops 1, 2
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # rows written
        else:
            self.queue = None

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        # The backbone sees each resolution as one batch; the head sees all crops at once, as in SwAV's code.
        h = concat_forward(self.backbone, views[:2])
        if len(views) > 2:
            h += concat_forward(self.backbone, views[2:])
        z = _unit(self.head(torch.cat(h)))  # (V * N, D)
        z_crops = list(z.chunk(len(views)))  # V x (N, D)
        scores = [_scores(z_t, self.prototypes) for z_t in z_crops]  # V x (N, K)
        codes = [self._codes(s, z_crops[s_id], s_id, step.gather) for s_id, s in enumerate(scores[:2])]
        if self.queue is not None:  # the queue holds the rows of the global batch
            rows = views[0].shape[0] * step.gather.world_size
            self.queue_filled.add_(rows).clamp_(max=self.queue.shape[1])
        loss = swav_loss(scores, codes, self.settings.temperature)
        return StepOutput(loss=loss, embedding=z_crops[0])

    @torch.no_grad()
    def _codes(self, scores: Tensor, z: Tensor, crop: int, gather: Gather) -> Tensor:
        """Sinkhorn codes q of one global crop (N, K); with a full queue, its scores join the batch."""
        n = scores.shape[0]
        scores = scores.detach()
        if self.queue is not None:
            queue = self.queue[crop]  # (Q, D), the same in every process
            if int(self.queue_filled) == queue.shape[0]:
                mine = queue[gather.rank :: gather.world_size]  # this process's rows of the queue (Q / W, D)
                scores = torch.cat([_scores(mine, self.prototypes.detach()).to(scores.dtype), scores])
            self.queue[crop] = torch.cat([gather(z.detach()).to(queue.dtype), queue])[: queue.shape[0]]
        across = {"processes": gather} if gather.world_size > 1 else {}  # sums over every process's columns
        return sinkhorn(scores, self.settings.sinkhorn_eps, self.settings.sinkhorn_iters, **across)[-n:]

    def before_optimizer_step(self, step: StepContext) -> None:
        s = self.settings
        if step.epochs_done < s.freeze_prototypes or step.progress < s.freeze_fraction:
            self.prototypes.grad = None  # frozen prototypes: no update, momentum or weight decay

    @torch.no_grad()
    def after_step(self, step: StepContext) -> None:
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))


@full_precision
def _unit(h: Tensor) -> Tensor:
    """z = h / |h| (N, D), in float32 under autocast, as the scores it feeds."""
    return F.normalize(h, dim=1)


@full_precision
def _scores(z: Tensor, prototypes: Tensor) -> Tensor:
    """Prototype scores z . C (N, K), in float32 under autocast (SwAV's code runs them in fp16): the codes
    divide them by epsilon = 0.05 and the loss by T = 0.1, which would make bf16's rounding (~0.004) ~0.1.
    """
    return z @ prototypes.T
