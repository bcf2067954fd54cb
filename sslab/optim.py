"""Optimisers (SGD, LARS, Adam, AdamW) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable

import torch
from torch import nn

from sslab.config import TrialConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as used by SimCLR and BYOL.

    Parameters in groups with `lars_exclude=True` (biases, batch-norm) get neither weight decay nor
    adaptation, following SimCLR's implementation.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    # Optimizer.step's overloads return the closure's loss; LARS never calls a closure and returns None.
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            exclude = group.get("lars_exclude", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not exclude:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (grad_norm > 0),
                        group["eta"] * param_norm / grad_norm,
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return None


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules list in timm's `no_weight_decay()` (pos_embed, cls_token)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def _split_decay(
    parameters: Iterable[nn.Parameter], no_decay_ids: Collection[int] = ()
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, then biases, norms and `no_decay_ids`): the second group gets no weight decay."""
    decay: list[nn.Parameter]
    no_decay: list[nn.Parameter]
    decay, no_decay = [], []
    for parameter in parameters:
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or id(parameter) in no_decay_ids else decay).append(parameter)
    return decay, no_decay


def scaled_lr(config: TrialConfig) -> float:
    return config.lr * config.batch_size / 256


def build_optimizer(
    config: TrialConfig, model: nn.Module, fixed_lr: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """Parameter groups: weights with decay; biases, norms, positional embeddings and class tokens without
    (the ViT recipe of DeiT and timm's training script); `fixed_lr` ones skip the schedule."""
    fixed = list(fixed_lr)
    fixed_ids = {id(p) for p in fixed}
    names = _no_decay_names(model)
    skip = {id(p) for name, p in model.named_parameters() if name in names}
    decay, no_decay = _split_decay((p for p in model.parameters() if id(p) not in fixed_ids), skip)
    fixed_decay, fixed_no_decay = _split_decay(fixed, skip)
    lr = scaled_lr(config)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "decays": True},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        {"params": fixed_decay, "weight_decay": config.weight_decay, "fixed_lr": True, "decays": True},
        {"params": fixed_no_decay, "weight_decay": 0.0, "lars_exclude": True, "fixed_lr": True},
    ]
    groups = [group for group in groups if group["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


@torch.no_grad()
def clip_each_gradient(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale every parameter's gradient to an l2 norm of at most `max_norm`, each on its own (DINO's
    `clip_gradients`, unlike torch's clip_grad_norm_ over all of them)."""
    for parameter in parameters:
        if parameter.grad is not None:
            coefficient = max_norm / (parameter.grad.norm(2) + 1e-6)
            parameter.grad.mul_(coefficient.clamp(max=1.0))


def weight_decay_at(step: int, total_steps: int, start: float, end: float | None) -> float:
    """DINO's weight-decay schedule: a cosine from `start` at step 0 to `end` at the last step."""
    if end is None:
        return start
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
