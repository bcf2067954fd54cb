"""DINO (Caron et al. 2021): self-distillation from a momentum teacher, with centering and sharpening.

Student g_s and teacher g_t share the architecture: backbone, MLP head to a 256-d bottleneck,
l2-normalisation, then a weight-normalised last layer (weight g fixed to 1) to K = `out_dim` outputs. The
teacher sees the two global crops, the student all crops (multi-crop). Algorithm 1:
loss = H(softmax((t - c) / tau_t), softmax(s / tau_s)) over crop pairs; the teacher is an EMA of the
student (momentum `ema`, raised to 1 on a cosine when `ema_cosine`), c an EMA of the teacher's batch mean.
The last layer is frozen during the first `dino.freeze_prototypes` epochs (DINO's freeze_last_layer). The
student's backbone is the one probed; the paper evaluates the teacher. On a ViT the head is DINO's DINOHead:
GELU, truncated-normal weights (std 0.02); its ViT recipe also drops the batch-norm (`head_bn = false`). Each
step reports `teacher_entropy`, the mean entropy of the centred, sharpened teacher distribution: 0 when it
collapses to one dimension (no centering), log K when it collapses to the uniform (no sharpening).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.losses import dino_center, dino_loss, full_precision
from sslab.methods.base import Method, StepContext, StepOutput, concat_forward, register
from sslab.metrics import TEACHER_ENTROPY
from sslab.models import Backbone, Head, build_head
from sslab.optim import clip_each_gradient
from sslab.settings import MethodSettings, Setting

BOTTLENECK = 256  # DINO head's l2-normalised bottleneck before the last layer


@torch.no_grad()
def teacher_entropy(teacher_out: list[Tensor], center: Tensor, teacher_temp: float) -> Tensor:
    """Mean over the rows of every teacher output (B, K) of H(P_t), P_t = softmax((t - c) / tau_t).

    The teacher's targets in `dino_loss`: 0 nats for one-hot targets, log K for uniform ones.
    """
    t = torch.cat([x.detach().float() for x in teacher_out])  # (2B, K)
    log_p = F.log_softmax((t - center.float().reshape(1, -1)) / teacher_temp, dim=1)  # (2B, K)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def truncated_normal_init(module: nn.Module) -> None:
    """DINO's head initialisation: linear weights from a truncated normal of std 0.02, biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOSettings(MethodSettings):
    name = "dino"
    paper = "Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers"
    multicrop = True
    multiprocess = True  # tests/test_distributed_methods.py
    # 2: the last layer in float32 under autocast; 3: the paper's global crops (scale 0.4-1), weight decay
    # on a cosine from 0.04 to 0.4, and every gradient clipped to a norm of 3
    version = 3
    earlier_shared_defaults = {3: {"aug": "crop(scale=0.2-1),flip,color(s=0.5)", "weight_decay_end": None}}
    shared_defaults = {
        "head": 3,  # 3-layer MLP (hidden 2048) to the bottleneck, as in the paper
        "head_width": 2048,
        # head_bn stays on (TrialConfig's default; DINO's use_bn_in_head, off in its ViT recipe, which ViT
        # trials set with head_bn = false, as studies/dino-centering.toml does): a random small CNN
        # maps all images to nearly the same h, so without it the centred teacher targets are nearly uniform
        # and short runs collapse to the uniform output (measured: the loss stays at log K).
        # K = 65536 for ImageNet; 4096 (solo-learn's CIFAR setting) keeps the last layer at 1M weights
        # while far exceeding the number of classes.
        "out_dim": 4096,
        # AdamW, DINO's optimiser for ViTs (lr 5e-4 per 256 images, weight decay from 0.04 there). SGD, the
        # paper's choice for ResNet-50, ended below the random-init probe in the same runs (lr 0.1 and 0.3).
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,  # DINO's cosine weight-decay schedule
        # global crops of 0.4-1 of the image against local crops of 0.05-0.4 (its global_crops_scale)
        "aug": "crop(scale=0.4-1),flip,color(s=0.5)",
        "local_crops": 2,  # 2 global + 10 local crops in the paper; 2 local crops add ~40% to a step
    }

    temperature = Setting(0.1, "student softmax temperature tau_s", "DINO", above=0)
    # The paper's warm-up to 0.07 softens the targets; in short runs that kept the loss nearer log K.
    teacher_temp = Setting(
        0.04, "teacher softmax temperature tau_t after the warm-up", "DINO's code default", above=0
    )
    teacher_temp_start = Setting(0.04, "teacher temperature at the start of the warm-up", "DINO", above=0)
    teacher_temp_epochs = Setting(
        0.0, "linear warm-up of the teacher temperature, in epochs", "DINO", minimum=0
    )
    centering = Setting(True, "subtract the running centre c from the teacher's output", "DINO")
    center_momentum = Setting(
        0.9, "momentum of the running centre", "DINO", minimum=0, maximum=1, needs="centering"
    )
    # 0.996 is for >100k steps; in a few hundred the teacher hardly moves from its random initialisation
    # (measured on 3,000 embedded images x 2 epochs: 0.99 and 0.95 stay at the random-init probe, 0.9
    # clears it).
    ema = Setting(
        0.9,
        "base teacher momentum, raised to 1 on a cosine",
        "measured here (0.996 in the paper)",
        minimum=0,
        maximum=1,
    )
    ema_cosine = Setting(True, "raise the teacher momentum to 1 on a cosine schedule", "DINO")
    clip_grad = Setting(
        3.0,
        "clip each parameter's gradient to this l2 norm (0: off)",
        "DINO (its utils.clip_gradients, per parameter)",
        minimum=0,
        earlier=((3, 0.0),),
    )
    # DINO freezes the last layer for 1 epoch of 100+; for runs of a few epochs that is ~0.
    freeze_prototypes = Setting(
        0.0, "epochs during which the last layer is frozen", "DINO (1 of 100+ epochs)", minimum=0
    )


@register(DINOSettings)
class DINO(Method):
    head: Head
    teacher_prototypes: Tensor  # the teacher's last layer (K, 256)
    center: Tensor  # c (1, K)

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__(config, backbone, num_classes)
        s = self.settings
        vit = config.backbone.startswith("vit_")
        self.head = build_head(  # the CNN head keeps ReLU and nn.Linear's initialisation (its trials' head)
            backbone.feature_dim,
            config.head,
            config.head_width,
            BOTTLENECK,
            config.head_bn,
            activation="gelu" if vit else "relu",
        )
        if vit:  # DINOHead._init_weights
            self.head.apply(truncated_normal_init)
        last = nn.Linear(BOTTLENECK, config.out_dim, bias=False)  # nn.Linear's initialisation
        self.prototypes = nn.Parameter(last.weight.detach())  # last layer V (K, 256)
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("teacher_prototypes", self.prototypes.detach().clone())
        self.register_buffer("center", torch.zeros(1, config.out_dim))  # c (1, K)
        self.teacher_temp = s.teacher_temp_start

    def forward(self, views: list[Tensor], labels: Tensor, step: StepContext) -> StepOutput:
        s = self.settings
        self.teacher_temp = self.teacher_temperature(step.epochs_done)
        h = concat_forward(self.backbone, views[:2])
        if len(views) > 2:
            h += concat_forward(self.backbone, views[2:])
        student = self._out(self.head(torch.cat(h)), self.prototypes).chunk(len(views))  # V x (N, K)
        with torch.no_grad():
            h_t = self.teacher["backbone"](torch.cat(views[:2]))  # (2N, D)
            teacher = self._out(self.teacher["head"](h_t), self.teacher_prototypes).chunk(2)  # 2 x (N, K)
        loss = dino_loss(list(student), list(teacher), self.center, s.temperature, self.teacher_temp)
        entropy = teacher_entropy(list(teacher), self.center, self.teacher_temp)  # with the c the loss used
        if s.centering:  # c follows the mean over the global batch
            self.center.copy_(dino_center(self.center, list(teacher), s.center_momentum, step.gather))
        return StepOutput(loss=loss, embedding=student[0], metrics={TEACHER_ENTROPY.name: entropy})

    @staticmethod
    @full_precision
    def _out(z: Tensor, v: Tensor) -> Tensor:
        """Last layer on the l2-normalised bottleneck z (B, 256): weight norm with g = 1 -> (B, K).

        In float32 under autocast (DINO's code runs it in fp16): outputs are cosines that the loss divides
        by tau_t = 0.04, which would multiply bf16's rounding (~0.004) to ~0.1 in the teacher's logits.
        """
        return F.normalize(z, dim=1) @ F.normalize(v, dim=1).T

    def teacher_temperature(self, epochs_done: float) -> float:
        """tau_t: linear from its start value to its final one over the warm-up epochs, then constant."""
        s = self.settings
        start, end, warmup = s.teacher_temp_start, s.teacher_temp, s.teacher_temp_epochs
        return end if epochs_done >= warmup else start + (end - start) * epochs_done / warmup

    def before_optimizer_step(self, step: StepContext) -> None:
        if self.settings.clip_grad > 0:  # clipped, then the frozen last layer cancelled, as DINO's loop does
            clip_each_gradient(self.parameters(), self.settings.clip_grad)
        if step.epochs_done < self.settings.freeze_prototypes:
            self.prototypes.grad = None

    def teacher_momentum(self, progress: float) -> float:
        """m = 1 - (1 - ema) (cos(pi p) + 1) / 2 with cosine, else ema (p: fraction of training done)."""
        if not self.settings.ema_cosine:
            return self.settings.ema
        return 1 - (1 - self.settings.ema) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def after_step(self, step: StepContext) -> None:
        m = self.teacher_momentum(step.progress_after)
        student = [*self.backbone.parameters(), *self.head.parameters(), self.prototypes]
        teacher = [*self.teacher["backbone"].parameters(), *self.teacher["head"].parameters()]
        for theta_t, theta_s in zip([*teacher, self.teacher_prototypes], student, strict=True):
            theta_t.lerp_(theta_s, 1 - m)  # theta_t <- m theta_t + (1 - m) theta_s
