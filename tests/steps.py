"""The step context a test passes to a method, as the trainer would."""

from __future__ import annotations

import torch

from sslab.methods.base import Gather, StepContext


def step_context(
    step: int = 0,
    total: int = 1,
    epochs: int = 1,
    indices: torch.Tensor | None = None,
    num_images: int = 64,
    gather: Gather | None = None,
    rows: int = 16,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> StepContext:
    """Step `step` of a `total`-step run of `epochs` epochs over `num_images` images."""
    return StepContext(
        progress=step / total,
        progress_after=(step + 1) / total,
        epochs_done=step * epochs / total,
        batch_indices=torch.arange(rows) if indices is None else indices,
        num_images=num_images,
        gather=gather or Gather(),
        mean=mean,
        std=std,
    )
