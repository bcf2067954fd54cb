"""The ops of pipeline version 1 whose behaviour version 2 changed (`sslab.pipeline`): trials recorded by
older releases are reproduced with them, and `benchmarks/augment_fidelity.py` measures the difference.

Version 1 drew a colour jitter's order once per batch and resampled crops bilinearly from fractional boxes,
without antialiasing.
"""

import math
from collections.abc import Mapping
from functools import cache, partial
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import OPS, OpFn, OpInfo, Range, _apply_where, _jitter_, _jitter_draws, _rand, grayscale


def _crop_boxes(
    n: int, height: int, width: int, scale: Range, ratio: Range, generator: torch.Generator, like: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample boxes (left, top, box width, box height), each (N,), in fractional pixels."""
    tries = 10
    area = _rand((n, tries), generator, like).mul_((scale[1] - scale[0]) * height * width)
    area.add_(scale[0] * height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = _rand((n, tries), generator, like).mul_(log_hi - log_lo).add_(log_lo).exp_()
    box_w = (area * aspect).sqrt_()  # (N, tries)
    box_h = (area / aspect).sqrt_()
    fits = (box_w <= width) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first fitting try, 0 if none fits
    found = fits.any(1)
    box_w = torch.where(found, box_w.gather(1, first).squeeze(1), float(width))  # (N,)
    box_h = torch.where(found, box_h.gather(1, first).squeeze(1), float(height))
    corner = _rand((n, 2), generator, like)
    return corner[:, 0] * (width - box_w), corner[:, 1] * (height - box_h), box_w, box_h


def crop(
    x: Tensor,
    generator: torch.Generator,
    scale: Range = (0.08, 1.0),
    ratio: Range = (0.75, 1.333),
    size: float = 0.0,
    inplace: bool = False,
) -> Tensor:
    n, _, h, w = x.shape
    left, top, box_w, box_h = _crop_boxes(n, h, w, scale, ratio, generator, x)
    out_h, out_w = (int(size), int(size)) if size else (h, w)
    # Sampling grid in grid_sample's [-1, 1] coordinates (align_corners=False: pixel i spans [i, i + 1)).
    cols = (torch.arange(out_w, device=x.device, dtype=x.dtype) + 0.5) / out_w  # (W,) output centres
    rows = (torch.arange(out_h, device=x.device, dtype=x.dtype) + 0.5) / out_h  # (H,)
    grid_x = (cols * box_w[:, None] + left[:, None]).mul_(2 / w).sub_(1)  # (N, W)
    grid_y = (rows * box_h[:, None] + top[:, None]).mul_(2 / h).sub_(1)  # (N, H)
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), -1)  # (N, H, W, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)  # clamp rounding overshoot


def jitter(
    x: Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    inplace: bool = False,
) -> Tensor:
    strengths = (brightness, contrast, saturation, hue)
    hit, factors = _jitter_draws(strengths, p, x.shape[0], generator, x)
    order = [k for k in _rand((4,), generator, x).argsort().tolist() if strengths[k] > 0]  # per batch
    if not order:
        return x
    return _apply_where(x, hit, partial(_jitter_, order=order), factors, inplace=inplace, writable=True)


def color(
    x: Tensor,
    generator: torch.Generator,
    s: float = 1.0,
    p: float = 0.8,
    gray: float = 0.2,
    inplace: bool = False,
) -> Tensor:
    a, h = 0.8 * s, 0.2 * s
    out = jitter(x, generator, brightness=a, contrast=a, saturation=a, hue=h, p=p, inplace=inplace)
    return grayscale(out, generator, p=gray, inplace=inplace or out is not x)


_VERSION_1: dict[str, OpFn] = {"crop": crop, "jitter": jitter, "color": color}


@cache
def ops_at(pipeline: int) -> Mapping[str, OpInfo]:
    """The op registry as pipeline version `pipeline` had it."""
    if pipeline >= 2:
        return OPS
    changed = {name: OpInfo(name, fn, OPS[name].doc, OPS[name].params) for name, fn in _VERSION_1.items()}
    return MappingProxyType({**OPS, **changed})
