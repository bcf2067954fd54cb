"""The interface every method implements, and the registry that builds them from a config."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods import catalog
from sslab.models import Backbone, Head
from sslab.settings import MethodSettings, SettingValues


@dataclass
class StepOutput:
    """What one training step of a method returns."""

    loss: Tensor  # scalar, differentiable
    embedding: Tensor  # (N, d) output watched by the collapse monitor
    # Per-step values of the method's own diagnostics (names from sslab.metrics, e.g. DINO's teacher entropy):
    # the trainer records their epoch means. Tensors stay on the device until the epoch ends.
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Gather:
    """All-gather of a tensor's rows across training processes, with gradients; the identity in one process.

    Under torchrun the trainer passes a distributed one in the step context: rows come back in rank order,
    so this process's N rows start at row `offset(N)` of the (world_size * N, ...) result. `sum` adds a
    tensor over the processes (batch statistics of the global batch). Both pass their gradient back summed
    over the processes (see `sslab.distributed`), so a loss computed from them, averaged over processes,
    is the loss of the global batch.
    """

    rank: int = 0
    world_size: int = 1

    def __call__(self, x: Tensor) -> Tensor:  # (N, ...) -> (world_size * N, ...)
        return x

    def offset(self, rows: int) -> int:
        return self.rank * rows

    def sum(self, x: Tensor) -> Tensor:  # (...) -> (...), summed over the processes
        return x


@dataclass(frozen=True)
class StepContext:
    """What the trainer tells a method about one training step, passed to every step hook."""

    progress: float  # fraction of training done before this step, in [0, 1)
    progress_after: float  # fraction done once this step's update is applied
    epochs_done: float  # `progress` in epochs (for settings given in epochs)
    batch_indices: Tensor  # (N,) rows of this process's share of the batch in the training set
    num_images: int  # training set size (sizes per-image state such as InstDisc's memory bank)
    gather: Gather  # collects rows over the global batch (the identity in one process)
    # Per-channel mean and std (1, C, 1, 1) the views were normalised with, in [0, 1] pixel units: methods
    # whose targets are pixels or colours (colourisation, inpainting) undo the normalisation with `pixels`.
    mean: Tensor | None = None
    std: Tensor | None = None

    def pixels(self, views: Tensor) -> Tensor:
        """Normalised views back in [0, 1] pixel units."""
        if self.mean is None or self.std is None:
            return views
        return views * self.std + self.mean


class Method(nn.Module):
    """A self-supervised method: built from the config, returns the loss for a batch of views.

    `backbone` is the encoder whose frozen features are evaluated; `head` (optional) is the projection
    head whose layers can also be probed. `settings` are the method's own, declared by the `MethodSettings`
    subclass it is registered with. Methods never move themselves to a device or call distributed APIs: the
    trainer does that, and passes each step's context (batch rows, dataset size, progress, gather).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    declaration: ClassVar[type[MethodSettings]]
    backbone: Backbone
    head: Head | None
    settings: SettingValues

    def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.settings = config.settings
        self.backbone = backbone
        self.head = None
        self.num_classes = num_classes

    def forward(
        self, views: list[Tensor], labels: Tensor, step: StepContext
    ) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def before_optimizer_step(self, step: StepContext) -> None:
        """Called after backward, before the optimiser step (e.g. to zero gradients of frozen parts)."""

    def after_step(self, step: StepContext) -> None:
        """Called after each optimiser step: momentum/EMA updates (`step.progress_after`: fraction done)."""

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """Parameters whose learning rate stays at the base rate instead of following the schedule."""
        return []


IMPLEMENTATIONS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(declaration: type[MethodSettings]) -> Callable[[M], M]:
    """Class decorator: `declaration` (the method's settings) names the method; the class implements it."""

    def add(cls: M) -> M:
        info = declaration.info
        cls.name, cls.paper, cls.declaration = info.name, info.paper, declaration
        IMPLEMENTATIONS[info.name] = cls
        catalog.add(info)
        return cls

    return add


def implementation(name: str) -> type[Method]:
    """The class implementing method `name`, importing its file if needed."""
    info = catalog.method_info(name)
    if name not in IMPLEMENTATIONS and info.module is not None:
        importlib.import_module(info.module)
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"method {name} is declared in {info.module} but not registered there")
    return IMPLEMENTATIONS[name]


def build_method(config: TrialConfig, backbone: Backbone, num_classes: int) -> Method:
    return implementation(config.method)(config, backbone, num_classes)


def concat_forward(module: Callable[[Tensor], Tensor], views: list[Tensor]) -> list[Tensor]:
    """Run views of equal shape through `module` as one batch (faster; batch-norm sees all views)."""
    outputs = module(torch.cat(views))
    return list(outputs.chunk(len(views)))
