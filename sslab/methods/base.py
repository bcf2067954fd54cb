"""The interface every method implements, and the registry that builds them from a config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.models import Backbone, Head


@dataclass
class StepOutput:
    """What one training step of a method returns."""

    loss: Tensor  # scalar, differentiable
    embedding: Tensor  # (N, d) output watched by the collapse monitor
    metrics: dict[str, float] = field(default_factory=dict)


class Gather:
    """All-gather of a tensor's rows across training processes, with gradients; the identity in one process.

    Under torchrun the trainer gives each method a distributed one: rows come back in rank order, so this
    process's N rows start at row `offset(N)` of the (world_size * N, ...) result.
    """

    rank: int = 0
    world_size: int = 1

    def __call__(self, x: Tensor) -> Tensor:  # (N, ...) -> (world_size * N, ...)
        return x

    def offset(self, rows: int) -> int:
        return self.rank * rows


class Method(nn.Module):
    """A self-supervised method: built from the config, returns the loss for a batch of views.

    `backbone` is the encoder whose frozen features are evaluated; `head` (optional) is the projection
    head whose layers can also be probed. Methods never move themselves to a device or call distributed
    APIs: the trainer does that, and sets `gather` for what is taken over the global batch (negatives, ...).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # config fields this method sets differently from TrialConfig
    multicrop: ClassVar[bool] = False  # whether forward() uses local crops beyond the two global views
    backbone: Backbone
    head: Head | None
    # Set by the trainer: the training set size before training, the rows of each batch before its forward
    # (per-image state such as InstDisc's memory bank).
    num_images: int | None
    batch_indices: Tensor | None

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.head = None
        self.num_classes = num_classes
        self.gather = Gather()

    def forward(self, views: list[Tensor], labels: Tensor) -> StepOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def begin_step(self, progress: float) -> None:
        """Called before each forward with the fraction of training done so far (schedules, warm-ups)."""

    def before_optimizer_step(self, progress: float) -> None:
        """Called after backward, before the optimiser step (e.g. to zero gradients of frozen parts)."""

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done (momentum/EMA updates)."""

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters whose learning rate stays at the base rate instead of following the schedule."""
        return []


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build_method(config: TrialConfig, backbone: Backbone, num_classes: int) -> Method:
    try:
        factory: Callable[..., Method] = METHODS[config.method]
    except KeyError:
        raise ConfigError(f"unknown method '{config.method}'; valid methods: {', '.join(METHODS)}") from None
    return factory(config, backbone, num_classes)


def concat_forward(module: Callable[[Tensor], Tensor], views: list[Tensor]) -> list[Tensor]:
    """Run views of equal shape through `module` as one batch (faster; batch-norm sees all views)."""
    outputs = module(torch.cat(views))
    return list(outputs.chunk(len(views)))
