"""Trained weights kept after a trial, keyed by what pretraining computed (`TrialConfig.pretraining_hash`).

A trial that differs from a finished one only in how it is evaluated (another probe dataset, fine-tuning,
a kNN sweep) loads these instead of pretraining again, and a distillation method loads its teacher from
them. Files are read with `weights_only=True`: a weights file can never run code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslab.errors import SslabError

DEFAULT_WEIGHTS_DIR = Path("results/weights")
WEIGHTS_ENV = "SSLAB_WEIGHTS_DIR"
FORMAT = 1


def weights_dir(directory: str | Path | None = None) -> Path:
    """`directory`, else $SSLAB_WEIGHTS_DIR, else results/weights."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR)


@dataclass
class TrainedWeights:
    """A pretrained method's state and what is needed to rebuild and evaluate it without its data."""

    pretraining_hash: str
    trial_hash: str  # the trial that trained them
    config: dict[str, Any]  # that trial's stored config record
    state: dict[str, Tensor]  # method.state_dict()
    channels: int
    image_size: int
    num_classes: int
    mean: Tensor  # (1, C, 1, 1) normalisation of the pretraining images, in [0, 1] units
    std: Tensor
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochRecord fields, in epoch order
    baseline: dict[str, float] = field(default_factory=dict)  # label-free metrics of the random init
    train_seconds: float = 0.0
    images_per_s: float = 0.0
    collapsed: bool = False

    def payload(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


def path_for(pretraining_hash: str, directory: str | Path | None = None) -> Path:
    return weights_dir(directory) / f"{pretraining_hash}.pt"


def save(weights: TrainedWeights, directory: str | Path | None = None) -> Path:
    """Write atomically, so a crash never leaves a truncated file where a reader would look."""
    path = path_for(weights.pretraining_hash, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {name: tensor.detach().cpu() for name, tensor in weights.state.items()}
    torch.save({**weights.payload(), "state": state}, tmp)
    os.replace(tmp, path)
    return path


def load(pretraining_hash: str, directory: str | Path | None = None) -> TrainedWeights | None:
    """The weights kept for `pretraining_hash`, or None if there are none."""
    path = path_for(pretraining_hash, directory)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which and how to get past it
        raise SslabError(
            f"cannot read the weights file {path} ({type(exc).__name__}); delete it to pretrain again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SslabError(
            f"{path} is not an sslab weights file (format {FORMAT}); delete it to pretrain again"
        )
    payload.pop("format")
    return TrainedWeights(**payload)
