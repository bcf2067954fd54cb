"""Evaluation on frozen features: feature extraction, a full-batch linear probe and a weighted kNN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.methods.base import Method

PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # searched on the validation split when there is one
DEFAULT_PROBE_WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class FeatureSet:
    """Features of the un-augmented train and test images at one layer ('h', 'g1', 'g2', ...)."""

    layer: str
    train: Tensor  # (N, D) float32, on the evaluation device
    test: Tensor  # (M, D)


@torch.no_grad()
def extract_features(
    method: Method,
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
    all_layers: bool = False,
    batch_size: int = 1024,
) -> dict[str, Tensor]:
    """Features of uint8 `images` (N, C, H, W): {'h': (N, D)} plus {'g1': ..., 'gK': ...} with all_layers,
    float32 on `device`, where the probe and the kNN then run."""
    method.eval()
    mean, std = mean.to(device), std.to(device)
    channels_last = device.type != "mps" and method.backbone.channels_last
    chunks: dict[str, list[Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        x = (images[start : start + batch_size].to(device).float().div_(255.0) - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = method.backbone(x)
        outputs = {"h": h}
        if all_layers and method.head is not None:
            for depth, g in enumerate(method.head.intermediate(h), start=1):
                outputs[f"g{depth}"] = g
        for layer, value in outputs.items():
            chunks.setdefault(layer, []).append(value.float())
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int) -> Tensor:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS; returns (D+1, C)."""
    weights = torch.zeros(x.shape[1] + 1, num_classes, device=x.device, requires_grad=True)
    x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # bias as an extra input
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x1 @ weights, y) + 0.5 * weight_decay * weights[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def _accuracy(weights: Tensor, x: Tensor, y: Tensor) -> float:
    x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return (x1 @ weights).argmax(1).eq(y).float().mean().item()


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    weight_decay: float
    val_top1: float | None = None


def stratified_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (train, val) with `fraction` of each class held out, on the labels' device."""
    device, labels = labels.device, labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for cls in labels.unique():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        cut = int(round(members.numel() * fraction))
        val_parts.append(members[:cut])
        train_parts.append(members[cut:])
    return torch.cat(train_parts).sort().values.to(device), torch.cat(val_parts).sort().values.to(device)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    val_fraction: float = 0.0,
    weight_decay: float = DEFAULT_PROBE_WEIGHT_DECAY,
    max_iter: int = 100,
) -> ProbeResult:
    """Test top-1 of a linear classifier on frozen features.

    With `val_fraction` > 0 the weight decay is chosen from PROBE_WEIGHT_DECAYS on a held-out part of
    train, then the probe is refitted on all of train with it.
    """
    with torch.enable_grad():
        return _probe(train_x, train_y, test_x, test_y, num_classes, val_fraction, weight_decay, max_iter)


def _probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    val_fraction: float,
    weight_decay: float,
    max_iter: int,
) -> ProbeResult:
    train_x, test_x = _standardise(train_x.float(), test_x.float())
    val_top1 = None
    if val_fraction > 0:
        fit_index, val_index = stratified_split(train_y, val_fraction)
        scores = {}
        for candidate in PROBE_WEIGHT_DECAYS:
            weights = _fit_logistic(train_x[fit_index], train_y[fit_index], num_classes, candidate, max_iter)
            scores[candidate] = _accuracy(weights, train_x[val_index], train_y[val_index])
        weight_decay = max(scores, key=lambda wd: (scores[wd], wd))
        val_top1 = scores[weight_decay]
    weights = _fit_logistic(train_x, train_y, num_classes, weight_decay, max_iter)
    return ProbeResult(_accuracy(weights, test_x, test_y), weight_decay, val_top1)


@torch.no_grad()
def knn_top1(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018): class votes weighted by exp(sim / T)."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    k = min(k, train_x.shape[0])
    correct: float = 0  # .item() is typed int | float
    for start in range(0, test_x.shape[0], chunk):
        sims = test_x[start : start + chunk] @ train_x.T  # (B, N)
        top_sims, top_index = sims.topk(k, dim=1)  # (B, k)
        votes = sims.new_zeros(sims.shape[0], num_classes)
        votes.scatter_add_(1, train_y[top_index], (top_sims / temperature).exp())
        correct += votes.argmax(1).eq(test_y[start : start + chunk]).sum().item()
    return correct / test_x.shape[0]


def knn_val_top1(
    train_x: Tensor, train_y: Tensor, num_classes: int, val_fraction: float, k: int, temperature: float
) -> float:
    """Weighted-kNN top-1 of the validation split of train (the probe's), voted by the rest of train: a
    number to select and prune on that never looks at the test set."""
    fit_index, val_index = stratified_split(train_y, val_fraction)
    return knn_top1(
        train_x[fit_index],
        train_y[fit_index],
        train_x[val_index],
        train_y[val_index],
        num_classes,
        k,
        temperature,
    )


@torch.no_grad()
def knn_grid(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    ks: tuple[int, ...],
    temperatures: tuple[float, ...],
    chunk: int = 1024,
) -> dict[tuple[int, float], float]:
    """Weighted-kNN top-1 at every (k, temperature) of a grid, from one similarity pass per test chunk."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    ks = tuple(min(k, train_x.shape[0]) for k in ks)
    correct = dict.fromkeys(((k, t) for k in ks for t in temperatures), 0.0)
    for start in range(0, test_x.shape[0], chunk):
        sims = test_x[start : start + chunk] @ train_x.T  # (B, N)
        top_sims, top_index = sims.topk(max(ks), dim=1)  # (B, k_max), sorted: the first k are the k nearest
        truth = test_y[start : start + chunk]
        for k in ks:
            neighbours = train_y[top_index[:, :k]]
            for t in temperatures:
                votes = sims.new_zeros(sims.shape[0], num_classes)
                votes.scatter_add_(1, neighbours, (top_sims[:, :k] / t).exp())
                correct[k, t] += votes.argmax(1).eq(truth).sum().item()
    return {key: value / test_x.shape[0] for key, value in correct.items()}
