"""Representation metrics that need no labels: RankMe, alignment and uniformity.

- RankMe (Garrido et al. 2023): the effective rank exp(H(p)) of the features, p the singular values
  normalised to sum to one; high when the representation uses many dimensions, 1 when it has collapsed.
- Alignment and uniformity (Wang & Isola 2020), on l2-normalised features: alignment E||f(x) - f(x')||^2 over
  two augmentations of one image (lower: views agree), uniformity log E exp(-2 ||f(x) - f(y)||^2) over pairs
  of different images (lower: spread over the sphere).

All three are measured on the backbone features h (what the probes read) of a fixed sample of the training
images, so they can be followed per epoch in studies without labels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE = 1024  # images measured; RankMe sees at most this rank (ResNet-50's 2048 features: capped)
_EPS = 1e-7  # the RankMe paper's epsilon, added to each normalised singular value


def rankme(features: Tensor) -> float:
    """Effective rank of (N, D) features: exp of the entropy of their normalised singular values."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"rankme needs (N >= 2, D) features, got {tuple(features.shape)}")
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum().clamp_min(1e-300) + _EPS
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(f1: Tensor, f2: Tensor, alpha: float = 2.0) -> float:
    """E ||f1_i - f2_i||^alpha of l2-normalised (N, D) features of two views of the same N images."""
    f1, f2 = F.normalize(f1.double(), dim=1), F.normalize(f2.double(), dim=1)
    return float((f1 - f2).norm(dim=1).pow(alpha).mean())


def uniformity(features: Tensor, t: float = 2.0) -> float:
    """log E_{i<j} exp(-t ||f_i - f_j||^2) of l2-normalised (N, D) features."""
    f = F.normalize(features.double(), dim=1)
    distances = torch.pdist(f, p=2).pow(2)  # the N(N-1)/2 pairs i < j
    return float(distances.mul(-t).exp().mean().log())


def sample_indices(num_images: int, seed: int) -> Tensor:
    """The fixed sample of training images the metrics are measured on (the same every epoch)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_images, generator=generator)[: min(SAMPLE, num_images)].sort().values


@torch.no_grad()
def measure(
    backbone: nn.Module,
    images: Tensor,
    make_views: Callable[[Tensor, torch.Generator], list[Tensor]],
    mean: Tensor,
    std: Tensor,
    seed: int,
    channels_last: bool = True,
    batch_size: int = 512,
) -> dict[str, float]:
    """RankMe and uniformity of h on un-augmented `images` (uint8, on the training device), alignment between
    the first two training views of them. Views come from a generator of their own (seeded by `seed`), so
    measuring leaves the training's random streams untouched; the backbone runs in eval mode."""
    was_training = backbone.training
    backbone.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    plain: list[Tensor] = []
    first: list[Tensor] = []
    second: list[Tensor] = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float().div_(255.0)
        v1, v2 = make_views(x, generator)[:2]
        for out, batch in ((plain, x), (first, v1), (second, v2)):
            batch = (batch - mean) / std
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(backbone(batch).float().cpu())
    backbone.train(was_training)
    h, h1, h2 = torch.cat(plain), torch.cat(first), torch.cat(second)
    return {"rankme": rankme(h), "alignment": alignment(h1, h2), "uniformity": uniformity(h)}
