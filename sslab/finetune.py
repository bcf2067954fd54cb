"""Fine-tuning evaluation: the pretrained backbone and a new linear classifier, all trained on the labels.

`finetune_labels` names the shares of the training labels to fine-tune on (SimCLRv2's semi-supervised
protocol: 1% and 10%; 100 is ordinary fine-tuning). Each share is class-balanced and fixed by the trial's
seed; with a validation split (`val_fraction`) it is drawn from the rest of train, and the fine-tuned network
is also scored on the split. Every share trains for the same number of steps with the same schedule, and no
choice looks at the test set: the test images are scored once, at the end.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.augment.view import View, parse_view
from sslab.config import TrialConfig, label_percents
from sslab.errors import SslabError
from sslab.evaluate import stratified_split
from sslab.methods.base import Method
from sslab.metrics import FINETUNE_TOP1, FINETUNE_VAL_TOP1, labelled_name
from sslab.pipeline import derived_seed


def labelled_subset(labels: Tensor, percent: float, seed: int, pool: Tensor | None = None) -> Tensor:
    """Sorted indices of `percent`% of each class's images among `pool` (default: all), at least one per
    class, the same for the same seed."""
    pool = torch.arange(labels.numel()) if pool is None else pool
    generator = torch.Generator().manual_seed(derived_seed(seed, f"labels-{percent:g}"))
    chosen = []
    for cls in labels.unique():
        members = pool[labels[pool] == cls]
        members = members[torch.randperm(members.numel(), generator=generator)]
        chosen.append(members[: max(1, round(members.numel() * percent / 100))])
    return torch.cat(chosen).sort().values


class FineTuned(nn.Module):
    """The pretrained backbone (and optionally the head's first layer) with a linear classifier on top."""

    def __init__(self, method: Method, num_classes: int, from_layer: str) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(method.backbone).requires_grad_(True)  # all of it, even frozen parts
        dim = method.backbone.feature_dim
        self.middle: nn.Module = nn.Identity()
        if from_layer == "g1":
            if method.head is None or len(method.head.layers) < 2:
                raise SslabError(f"finetune_from=g1: method {method.name} has no head with a hidden layer")
            first = method.head.layers[0]
            self.middle = copy.deepcopy(first)
            dim = next(m.out_features for m in first.modules() if isinstance(m, nn.Linear))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.middle(self.backbone(x)))


def _uses_channels_last(module: nn.Module, device: torch.device) -> bool:
    return device.type != "mps" and bool(getattr(module, "channels_last", True))


@torch.no_grad()
def _top1(
    model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, channels_last: bool
) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], 1024):
        x = (images[start : start + 1024].float().div_(255.0) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        correct += int(model(x).argmax(1).eq(labels[start : start + 1024]).sum())
    return correct / max(1, images.shape[0])


def finetune(
    method: Method,
    config: TrialConfig,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Fine-tune a copy of `method`'s backbone on each share of `finetune_labels`: test top-1 per share
    (`finetune_top1`, `finetune_top1_10pct`, ...), and validation top-1 with a validation split."""
    metrics: dict[str, float] = {}
    mean, std = mean.to(device), std.to(device)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    pool = val = None
    if config.val_fraction > 0:
        pool, val = stratified_split(train_labels.cpu(), config.val_fraction)
    augment = parse_view(config.finetune_aug, config.pipeline_version)
    for percent in label_percents(config.finetune_labels):
        chosen = labelled_subset(train_labels.cpu(), percent, config.seed, pool).to(device)
        torch.manual_seed(derived_seed(config.seed, f"finetune-init-{percent:g}"))
        model = FineTuned(method, num_classes, config.finetune_from).to(device)
        channels_last = _uses_channels_last(method.backbone, device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        labelled = train_images[chosen], train_labels[chosen]
        _train(model, config, *labelled, augment, mean, std, device, amp_dtype)
        metrics[labelled_name(FINETUNE_TOP1, percent)] = _top1(
            model, test_images, test_labels, mean, std, channels_last
        )
        if val is not None:
            val_index = val.to(device)
            metrics[labelled_name(FINETUNE_VAL_TOP1, percent)] = _top1(
                model, train_images[val_index], train_labels[val_index], mean, std, channels_last
            )
    return metrics


def _train(
    model: FineTuned,
    config: TrialConfig,
    images: Tensor,
    labels: Tensor,
    augment: View,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> None:
    batch = min(config.finetune_batch, images.shape[0])
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.finetune_weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.finetune_lr,
        momentum=0.9,
        nesterov=True,
    )
    order_rng = torch.Generator().manual_seed(derived_seed(config.seed, f"finetune-order-{images.shape[0]}"))
    augment_rng = torch.Generator(device=device).manual_seed(derived_seed(config.seed, "finetune-augment"))
    channels_last = _uses_channels_last(model.backbone, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model.train()
    order = torch.randperm(images.shape[0], generator=order_rng)
    cursor = 0
    for step in range(config.finetune_steps):
        if cursor + batch > order.numel():
            order, cursor = torch.randperm(images.shape[0], generator=order_rng), 0
        rows = order[cursor : cursor + batch].to(device)
        cursor += batch
        lr = config.finetune_lr * 0.5 * (1 + math.cos(math.pi * step / config.finetune_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = (augment(images[rows].float().div_(255.0), augment_rng) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[rows])
        if not torch.isfinite(loss):
            raise SslabError(f"fine-tuning diverged (non-finite loss at step {step + 1}); lower finetune_lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    model.eval()
