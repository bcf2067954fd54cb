"""The frozen teacher of the distillation methods (seed, distill): a finished trial's backbone and head,
rebuilt from its kept weights (`sslab.weights`) and never trained."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from sslab import weights
from sslab.config import from_mapping
from sslab.errors import ConfigError
from sslab.methods.base import StepContext, build_method
from sslab.models import backbone_for

PRETRAINING_HASH = re.compile(r"^[0-9a-f]{16}$")


class FrozenTeacher(nn.Module):
    """z^T = g^T(f^T(x)), without gradient, in eval mode whatever mode its owner is put in.

    It is a submodule of the method, so it moves to the training device with it and is saved in its
    state_dict, but its parameters have requires_grad False, which keeps them out of the optimiser.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: nn.Module, out_dim: int, trained: weights.TrainedWeights) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.out_dim = out_dim
        self.pretraining_hash = trained.pretraining_hash
        self.image_shape = (trained.channels, trained.image_size, trained.image_size)
        # The teacher's own input normalisation: student views are brought back to pixels and renormalised.
        self.register_buffer("mean", trained.mean.float().reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", trained.std.float().reshape(1, -1, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval: the teacher's batch-norm keeps the statistics it was trained with."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, step: StepContext) -> Tensor:  # (N, C, H, W) -> (N, D)
        if tuple(x.shape[1:]) != self.image_shape:
            c, s, _ = self.image_shape
            raise ConfigError(
                f"the teacher {self.pretraining_hash} was trained on {c}-channel {s}x{s} images, this "
                f"trial's views are {x.shape[1]}-channel {x.shape[2]}x{x.shape[3]}: train a teacher on this "
                "data first (sslab run --dataset ... --image-size ...), or set image_size to match"
            )
        if step.mean is not None and step.std is not None:
            x = (step.pixels(x) - self.mean) / self.std
        return self.encoder(x)


def load_teacher(method: str, pretraining_hash: str) -> FrozenTeacher:
    """The teacher kept under `pretraining_hash` (in $SSLAB_WEIGHTS_DIR, else results/weights), or a one-line
    ConfigError saying what to do."""
    if not pretraining_hash:
        raise ConfigError(
            f"{method} needs --set {method}.teacher=... (a finished trial's id, config hash, pretraining "
            "hash or STUDY:axis=value cell)"
        )
    if not PRETRAINING_HASH.match(pretraining_hash):
        raise ConfigError(
            f"{method}.teacher={pretraining_hash!r} is not a pretraining hash (16 hex digits); `sslab run` "
            "and `sslab study run` resolve trial ids, config hashes and study cells "
            "(sslab.teachers.resolve_teacher)"
        )
    trained = weights.load(pretraining_hash)
    if trained is None:
        raise ConfigError(
            f"{method}.teacher: no kept weights {weights.path_for(pretraining_hash)}; train the teacher "
            f"first: sslab run --method simclr --backbone resnet18 ..., then --set {method}.teacher=TRIAL_ID"
        )
    config = from_mapping(trained.config, source=f"teacher {pretraining_hash}", other_methods="ignore")
    with torch.random.fork_rng(devices=[]):  # the student's initial weights do not depend on the teacher
        backbone = backbone_for(config, trained.channels, trained.image_size)
        teacher = build_method(config, backbone, trained.num_classes)
    teacher.load_state_dict(trained.state)
    if teacher.head is None:
        return FrozenTeacher(teacher.backbone, teacher.backbone.feature_dim, trained)
    return FrozenTeacher(nn.Sequential(teacher.backbone, teacher.head), teacher.head.out_dim, trained)


def check_dimensions(method: str, student_dim: int, teacher: FrozenTeacher) -> None:
    """The student's embedding is compared with the teacher's, dimension by dimension: they must agree."""
    if student_dim != teacher.out_dim:
        raise ConfigError(
            f"{method}: the student's embedding has {student_dim} dimensions and the teacher's "
            f"{teacher.out_dim}: set out_dim={teacher.out_dim} (with head >= 1)"
        )
