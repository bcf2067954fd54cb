"""Batched colour helpers: luma, RGB <-> HSV and per-sample colour adjustments.

Images are float (N, C, H, W) tensors in [0, 1] with C in {1, 3}; per-sample factors are (N,) tensors.
The adjustments follow torchvision's tensor implementations (each clamps its result to [0, 1]). They
take an optional ``out`` buffer for the result, which may be ``x`` itself.

The code favours in-place ops on a few buffers: on CPU, writing fresh memory costs more than the
arithmetic, and comparisons and ``torch.where`` are several times slower than plain arithmetic.
"""

import torch
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 weights for R, G, B

# A channel's value peaks at its own hue (R at 0, G at 2, B at 4 sixths of a turn); `_from_hue6`
# measures hue distances from the opposite hue, hence 3, 5, 1.
_OPPOSITE_HUE6 = (3.0, 5.0, 1.0)


def _per_sample(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)  # (N,) -> (N, 1, 1, 1)


def _unchanged(x: Tensor, out: Tensor | None) -> Tensor:
    return x if out is None or out is x else out.copy_(x)


def to_gray(x: Tensor) -> Tensor:
    """Luma of (N, C, H, W) images as (N, 1, H, W); single-channel images are returned unchanged."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2])  # (N, 1, H, W)


def _hue6(x: Tensor, maxc: Tensor, minc: Tensor, shift6: Tensor | float = 0.0) -> Tensor:
    """HSV hue of (N, 3, H, W) RGB in [0, 1], plus `shift6`, in sixths of a turn wrapped into [0, 6).

    `maxc` and `minc` are the per-pixel channel max and min (N, 1, H, W); hue is 0 where they are equal.
    Returns (N, 1, H, W).
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    inv = torch.sub(maxc, minc).clamp_min_(1e-12).reciprocal_()  # 1 / chroma
    hue = torch.sub(b, r).mul_(inv).add_(2)  # the hue where green is the maximum
    other = torch.sub(r, g).mul_(inv).add_(4)  # where blue is
    # For values in [0, 1], ceil(max - channel) is 0 where the channel is the maximum and 1 elsewhere.
    below = torch.sub(maxc, g).ceil_()
    hue.lerp_(other, below)
    red = torch.sub(g, b, out=other).mul_(inv)  # where red is
    torch.sub(maxc, r, out=below).ceil_()
    hue = red.lerp_(hue, below).add_(shift6)
    return hue.sub_(torch.mul(hue, 1 / 6, out=below).floor_(), alpha=6)


def _from_hue6(hue6: Tensor, minc: Tensor, maxc: Tensor, out: Tensor | None = None) -> Tensor:
    """RGB (N, 3, H, W) from hue in sixths in [0, 6] and per-pixel min and max, all (N, 1, H, W).

    Overwrites `hue6` and `minc`.
    """
    opposite = hue6.new_tensor(_OPPOSITE_HUE6).view(1, 3, 1, 1)
    # A channel is at the maximum within 1 sixth of its own hue, at the minimum beyond 2 sixths and
    # linear in between. With d the difference from the channel's opposite hue (|d| < 6), that is
    # min + chroma * clamp(2 - ||d| - 3|, 0, 1) = (max + chroma) - chroma * clamp(||d| - 3|, 1, 2).
    dist = torch.sub(hue6, opposite, out=out).abs_().sub_(3).abs_().clamp_(1, 2)  # (N, 3, H, W)
    chroma = torch.sub(maxc, minc, out=hue6)
    top = torch.add(maxc, chroma, out=minc)
    return torch.sub(top, dist.mul_(chroma), out=dist).clamp_(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] to HSV, all channels in [0, 1] (hue as a fraction of a turn)."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    hue = _hue6(x, maxc, minc).div_(6)
    sat = (maxc - minc).div_(maxc.clamp_min(1e-12))
    return torch.cat([hue, sat, maxc], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """(N, 3, H, W) HSV (channels in [0, 1]) to RGB."""
    hue, sat, val = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    return _from_hue6(hue * 6, val - val * sat, val)


def adjust_brightness(x: Tensor, factor: Tensor, out: Tensor | None = None) -> Tensor:
    """Scale intensities by a per-sample factor."""
    return torch.mul(x, _per_sample(factor), out=out).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor, out: Tensor | None = None) -> Tensor:
    """Blend each image with its mean luma by a per-sample factor (0 gives a flat grey image)."""
    factor = _per_sample(factor)
    mean = to_gray(x).mean((1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    # x * f + mean * (1 - f): lerp with a broadcast start is several times slower on CPU
    return torch.mul(x, factor, out=out).add_(mean.mul_(1 - factor)).clamp_(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor, out: Tensor | None = None) -> Tensor:
    """Blend each image with its grayscale version by a per-sample factor; no-op for one channel."""
    if x.shape[1] == 1:
        return _unchanged(x, out)
    factor = _per_sample(factor)
    gray = to_gray(x).mul_(1 - factor)
    return torch.mul(x, factor, out=out).add_(gray).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """Rotate the HSV hue by a per-sample shift in turns (in [-0.5, 0.5]); no-op for one channel."""
    if x.shape[1] == 1:
        return _unchanged(x, out)
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)  # (N, 1, H, W)
    hue6 = _hue6(x, maxc, minc, _per_sample(shift * 6))
    return _from_hue6(hue6, minc, maxc, out=out)
