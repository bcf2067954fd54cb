"""Batched augmentation ops and their registry.

Every op is a function ``op(x, generator, **params, inplace=False) -> Tensor`` on float (N, C, H, W)
images in [0, 1] (C in {1, 3}) that returns images of the same shape in [0, 1]. Random parameters are
drawn per sample from ``generator`` (on ``x.device``), always the same draws for the same batch shape,
so a seeded generator gives identical outputs.

By default an op is pure: it leaves ``x`` untouched, though it may return ``x`` itself, or a view or
non-contiguous tensor, where that is cheaper, so callers must not modify the result in place.
``inplace=True`` lets an op overwrite ``x`` instead of copying it; ``View`` passes it for the
intermediate results it owns, which saves a full copy of the batch per probabilistic op.

Names, parameters and defaults are declared in `signatures.py`, which needs no torch.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.errors import AugmentError

from .color import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, to_gray
from .color_space import rgb_to_lab_unit
from .signatures import SIGNATURES, OpSignature, Param, Range, Value

OpFn = Callable[..., Tensor]

__all__ = ["OPS", "OpInfo", "Param", "Range", "Value", "register"]


@dataclass(frozen=True)
class OpInfo:
    """A registered op: its function with its signature's name, description and parameters."""

    name: str
    fn: OpFn
    doc: str
    params: Mapping[str, Param]
    random: bool = True

    def defaults(self) -> dict[str, Value]:
        return {key: param.default for key, param in self.params.items()}

    @property
    def signature(self) -> OpSignature:
        return OpSignature(self.name, self.doc, self.params, self.random)


OPS: dict[str, OpInfo] = {}


def register(name: str) -> Callable[[OpFn], OpFn]:
    """Decorator implementing the op that `signatures.SIGNATURES` declares under `name`."""
    signature = SIGNATURES[name]

    def add(fn: OpFn) -> OpFn:
        OPS[name] = OpInfo(name, fn, signature.doc, signature.params, signature.random)
        return fn

    return add


# --- random draws and per-sample dispatch ------------------------------------------------------------


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def _uniform(bounds: Range, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    lo, hi = bounds
    return _rand((n,), generator, like).mul_(hi - lo).add_(lo)  # (N,)


def _coin(p: float, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    return _rand((n,), generator, like) < p  # (N,) True with probability p


def _apply_where(
    x: Tensor, hit: Tensor, fn: OpFn, *args: Tensor, inplace: bool = False, writable: bool = False
) -> Tensor:
    """Apply ``fn(samples, *their args)`` to the samples where `hit` (N,) is set; pass the others through.

    Only the selected samples are computed: they are gathered, transformed and copied back into `x`
    (with `inplace`) or into a copy of it. With `writable`, `fn` may overwrite the samples it gets.
    """
    index = hit.nonzero().squeeze(1)  # (K,)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return fn(x.clone() if writable and not inplace else x, *args)
    part = fn(x.index_select(0, index), *(a.index_select(0, index) for a in args))
    return (x if inplace else x.clone()).index_copy_(0, index, part)


def _apply_grouped(x: Tensor, group: Tensor, fns: Sequence[OpFn]) -> Tensor:
    """Apply ``fns[k]`` to the samples whose `group` (N,) is k.

    Samples are sorted by group so each group is one contiguous run, transformed, and unsorted.
    """
    counts = torch.bincount(group, minlength=len(fns)).tolist()
    if max(counts) == x.shape[0]:
        return fns[counts.index(x.shape[0])](x)
    perm = group.argsort(stable=True)
    runs = x.index_select(0, perm).split(counts)
    out = torch.cat([fn(run) for fn, run in zip(fns, runs, strict=True)])
    return out.index_select(0, perm.argsort())


def _gray_like(x: Tensor) -> Tensor:
    return to_gray(x).expand_as(x)  # (N, C, H, W)


# --- geometric ops -----------------------------------------------------------------------------------


def _crop_boxes(
    n: int, height: int, width: int, scale: Range, ratio: Range, generator: torch.Generator, like: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample boxes (left, top, box width, box height), each (N,), in whole pixels, as torchvision's
    RandomResizedCrop samples them.

    Ten candidate boxes per sample (area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`,
    sides rounded to pixels); the first that fits inside the image wins, otherwise the whole image.
    """
    tries = 10
    area = _rand((n, tries), generator, like).mul_((scale[1] - scale[0]) * height * width)
    area.add_(scale[0] * height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = _rand((n, tries), generator, like).mul_(log_hi - log_lo).add_(log_lo).exp_()
    box_w = (area * aspect).sqrt_().round_()  # (N, tries)
    box_h = (area / aspect).sqrt_().round_()
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first fitting try, 0 if none fits
    found = fits.any(1)
    box_w = torch.where(found, box_w.gather(1, first).squeeze(1), float(width))  # (N,)
    box_h = torch.where(found, box_h.gather(1, first).squeeze(1), float(height))
    corner = _rand((n, 2), generator, like)
    left = corner[:, 0].mul(width - box_w + 1).floor_().clamp_max_(width - box_w)
    top = corner[:, 1].mul(height - box_h + 1).floor_().clamp_max_(height - box_h)
    return left, top, box_w, box_h


def resample_weights(start: Tensor, length: Tensor, size: int, out_size: int) -> Tensor:
    """(N, out_size, size) weights that resize the pixels [start, start + length) of a row of `size` pixels
    to `out_size` pixels, per sample: antialiased bilinear (a triangle filter widened by the downscaling
    factor, PIL's and torch's `antialias=True`); when enlarging, plain bilinear with edge pixels repeated."""
    scale = length / out_size  # (N,) source pixels per output pixel
    support = scale.clamp_min(1.0)[:, None, None]  # (N, 1, 1)
    outputs = torch.arange(out_size, device=start.device, dtype=start.dtype) + 0.5
    centres = start[:, None] + outputs * scale[:, None]  # (N, out) output pixel centres in source pixels
    taps = torch.arange(size, device=start.device, dtype=start.dtype) + 0.5  # (size,) source pixel centres
    weights = (taps - centres[:, :, None]).div_(support).abs_().neg_().add_(1).clamp_min_(0)  # (N, out, size)
    inside = (taps > start[:, None]) & (taps < (start + length)[:, None])  # (N, size): the box's pixels
    weights.mul_(inside[:, None, :])
    return weights.div_(weights.sum(-1, keepdim=True))


@register("crop")
def crop(
    x: Tensor,
    generator: torch.Generator,
    scale: Range = (0.08, 1.0),
    ratio: Range = (0.75, 1.333),
    size: float = 0.0,
    inplace: bool = False,
) -> Tensor:
    n, c, h, w = x.shape
    left, top, box_w, box_h = _crop_boxes(n, h, w, scale, ratio, generator, x)
    out_h, out_w = (int(size), int(size)) if size else (h, w)
    rows = resample_weights(top, box_h, h, out_h)  # (N, out_h, H)
    cols = resample_weights(left, box_w, w, out_w).transpose(1, 2).contiguous()  # (N, W, out_w)
    # Along W as one batched product over the rows of all channels, then along H with einsum: several times
    # faster on CPU than matmul's broadcasting of the weights over channels.
    along_w = torch.bmm(x.reshape(n, c * h, w), cols).view(n, c, h, out_w)
    return torch.einsum("nyh,nchw->ncyw", rows, along_w).clamp_(0, 1)  # (N, C, out_h, out_w)


@register("flip")
def flip(x: Tensor, generator: torch.Generator, p: float = 0.5, inplace: bool = False) -> Tensor:
    hit = _coin(p, x.shape[0], generator, x)
    return _apply_where(x, hit, lambda part: part.flip(-1), inplace=inplace)


def _rot90(x: Tensor, turns: int) -> Tensor:
    """Rotate by `turns` quarter turns; non-square images are centre-cropped and zero-padded to keep H, W."""
    h, w = x.shape[-2:]
    out = torch.rot90(x, turns, (-2, -1))
    if turns % 2 == 0 or h == w:
        return out
    pad_w, pad_h = w - h, h - w  # negative padding crops
    return F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


@register("rotate")
def rotate(x: Tensor, generator: torch.Generator, inplace: bool = False) -> Tensor:
    turns = (_rand((x.shape[0],), generator, x) * 3).long()  # (N,) in {0, 1, 2} -> 1, 2, 3 quarter turns
    return _apply_grouped(x, turns, [partial(_rot90, turns=k) for k in (1, 2, 3)])


@register("cutout")
def cutout(
    x: Tensor, generator: torch.Generator, size: Range = (0.25, 0.5), p: float = 1.0, inplace: bool = False
) -> Tensor:
    n, _, h, w = x.shape
    hit = _coin(p, n, generator, x)
    side = _uniform(size, n, generator, x).mul_(min(h, w)).round_()  # (N,) pixels
    corner = _rand((n, 2), generator, x)
    top = (corner[:, 0] * (h + 1 - side)).floor_()[:, None]  # (N, 1)
    left = (corner[:, 1] * (w + 1 - side)).floor_()[:, None]
    rows = torch.arange(h, device=x.device, dtype=x.dtype)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    in_rows = ((rows >= top) & (rows < top + side[:, None]) & hit[:, None]).to(x.dtype)  # (N, H)
    in_cols = ((cols >= left) & (cols < left + side[:, None])).to(x.dtype)  # (N, W)
    keep = (in_rows[:, None, :, None] * in_cols[:, None, None, :]).neg_().add_(1)  # (N, 1, H, W)
    return x.mul_(keep) if inplace else x * keep


# --- photometric ops ---------------------------------------------------------------------------------

_ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _jitter_(x: Tensor, factors: Tensor, order: Sequence[int]) -> Tensor:
    """Apply the adjustments `order` lists (indices into _ADJUSTMENTS) in place; factors are (N, 4)."""
    for k in order:
        _ADJUSTMENTS[k](x, factors[:, k], out=x)
    return x


def _jitter_per_image_(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Apply each image's adjustments in its own order, in place: `order` (N, 4) holds indices into
    _ADJUSTMENTS, or 4 for none, per position; factors are (N, 4).

    Position by position, the images are sorted by the adjustment they get there, so each adjustment runs
    once per position on a contiguous run of images.
    """
    skip = len(_ADJUSTMENTS)
    for position in range(order.shape[1]):
        group = order[:, position]
        counts = torch.bincount(group, minlength=skip + 1).tolist()
        if counts[skip] == x.shape[0]:
            continue
        perm = group.argsort(stable=True)
        runs, run_factors = x.index_select(0, perm), factors.index_select(0, perm)
        start = 0
        for k, count in enumerate(counts[:skip]):
            if count:
                run = runs[start : start + count]
                _ADJUSTMENTS[k](run, run_factors[start : start + count, k], out=run)
            start += count
        x.index_copy_(0, perm, runs)
    return x


def _jitter_draws(
    strengths: Sequence[float], p: float, n: int, generator: torch.Generator, like: Tensor
) -> tuple[Tensor, Tensor]:
    """Which images a jitter changes (N,), and their brightness, contrast, saturation, hue factors (N, 4)."""
    hit = _coin(p, n, generator, like)
    brightness, contrast, saturation, hue = strengths
    lo = like.new_tensor([max(0.0, 1 - s) for s in (brightness, contrast, saturation)] + [-hue])  # (4,)
    hi = like.new_tensor([1 + s for s in (brightness, contrast, saturation)] + [hue])
    return hit, _rand((n, 4), generator, like).mul_(hi - lo).add_(lo)


@register("jitter")
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
    n = x.shape[0]
    strengths = (brightness, contrast, saturation, hue)
    hit, factors = _jitter_draws(strengths, p, n, generator, x)
    order = _rand((n, 4), generator, x).argsort(1)  # (N, 4): each image's own order, as torchvision draws it
    skipped = ~hit[:, None] | (x.new_tensor(strengths) == 0)[order]  # images missed, adjustments at zero
    order = order.masked_fill_(skipped, len(_ADJUSTMENTS))
    if all(s == 0 for s in strengths):
        return x
    return _jitter_per_image_(x if inplace else x.clone(), factors, order)


@register("grayscale")
def grayscale(x: Tensor, generator: torch.Generator, p: float = 0.2, inplace: bool = False) -> Tensor:
    hit = _coin(p, x.shape[0], generator, x)
    return x if x.shape[1] == 1 else _apply_where(x, hit, _gray_like, inplace=inplace)


@register("color")
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
    # jitter's result is ours to overwrite unless it is x itself
    return grayscale(out, generator, p=gray, inplace=inplace or out is not x)


@register("solarize")
def solarize(
    x: Tensor, generator: torch.Generator, threshold: float = 0.5, p: float = 0.2, inplace: bool = False
) -> Tensor:
    hit = _coin(p, x.shape[0], generator, x)
    return _apply_where(x, hit, lambda part: torch.where(part >= threshold, 1 - part, part), inplace=inplace)


@register("noise")
def noise(x: Tensor, generator: torch.Generator, std: float = 0.1, inplace: bool = False) -> Tensor:
    n = x.shape[0]
    sigma = _uniform((0.0, std), n, generator, x)
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return eps.mul_(sigma.view(n, 1, 1, 1)).add_(x).clamp_(0, 1)


def _blur_size(fraction: float, side: int) -> int:
    """Odd kernel side closest to fraction * side, at least 3, at most 2 * side - 1 (reflect padding)."""
    return min(max(3, 2 * int(fraction * side / 2) + 1), 2 * side - 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, size: int) -> Tensor:
    """Separable Gaussian blur with per-sample sigma (N,), square kernel of odd `size`, reflect padding."""
    n, _, h, w = x.shape
    radius = size // 2
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (K,)
    kernel = (taps / sigma[:, None]).square_().mul_(-0.5).exp_()  # (N, K)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, 1, size)  # (N, 1, 1, K)
    # Shifted multiply-adds beat a grouped convolution several times over for the small kernels of
    # small images, and run unchanged on any device.
    padded = F.pad(x, (radius,) * 4, mode="reflect")  # (N, C, H + 2r, W + 2r)
    rows = padded[..., 0:w] * kernel[..., 0:1]  # (N, C, H + 2r, W): blurred along W
    for i in range(1, size):
        rows.addcmul_(padded[..., i : i + w], kernel[..., i : i + 1])
    out = rows[..., 0:h, :] * kernel[..., 0:1]  # (N, C, H, W): and along H
    for i in range(1, size):
        out.addcmul_(rows[..., i : i + h, :], kernel[..., i : i + 1])
    return out.clamp_(0, 1)  # rounding can overshoot 1 by an ulp


@register("blur")
def blur(
    x: Tensor,
    generator: torch.Generator,
    sigma: Range = (0.1, 2.0),
    p: float = 0.5,
    kernel: float = 0.1,
    inplace: bool = False,
) -> Tensor:
    n, _, h, w = x.shape
    hit = _coin(p, n, generator, x)
    sigmas = _uniform(sigma, n, generator, x)
    if min(h, w) < 2:
        return x
    size = _blur_size(kernel, min(h, w))
    return _apply_where(x, hit, partial(_gaussian_blur, size=size), sigmas, inplace=inplace)


_SOBEL_SMOOTH = (1.0, 2.0, 1.0)


def _sobel_magnitude(gray: Tensor) -> Tensor:
    """Sobel gradient magnitude of (N, 1, H, W) images, replicate padding."""
    h, w = gray.shape[-2:]
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")  # (N, 1, H+2, W+2)
    dx = padded[..., 2:] - padded[..., :-2]  # (N, 1, H+2, W) central differences
    dy = padded[..., 2:, :] - padded[..., :-2, :]  # (N, 1, H, W+2)
    a, b, c = _SOBEL_SMOOTH
    gx = dx[..., 0:h, :] * a + dx[..., 1 : h + 1, :] * b + dx[..., 2 : h + 2, :] * c
    gy = dy[..., 0:w] * a + dy[..., 1 : w + 1] * b + dy[..., 2 : w + 2] * c
    return torch.hypot(gx, gy)  # (N, 1, H, W)


@register("sobel")
def sobel(x: Tensor, generator: torch.Generator, inplace: bool = False) -> Tensor:
    magnitude = _sobel_magnitude(to_gray(x))
    peak = magnitude.amax((1, 2, 3), keepdim=True).clamp_min_(1e-12)  # (N, 1, 1, 1)
    return magnitude.div_(peak).clamp_(0, 1).expand_as(x)


@register("lab")
def lab(x: Tensor, generator: torch.Generator, inplace: bool = False) -> Tensor:
    if x.shape[1] != 3:
        raise AugmentError(f"lab: needs RGB images (3 channels), got {x.shape[1]} channel(s)")
    return rgb_to_lab_unit(x)


@register("identity")
def identity(x: Tensor, generator: torch.Generator, inplace: bool = False) -> Tensor:
    return x
