"""Pure tensor functions behind the pretext-task methods: rotations, patch grids, colour counter-measures and
the jigsaw permutation set. No randomness is drawn here: the methods draw it and pass it in.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sslab.errors import ConfigError

# The smallest patch side a backbone is fed: SmallCNN's three stride-2 stages take 8 px to 1 px. Every
# backbone ends in an adaptive pool, so patches of any larger size can go in.
MIN_PATCH_SIDE = 8


def rotate_quarter_turns(x: Tensor, turns: Tensor) -> Tensor:
    """Image x[i] (N, C, H, W) rotated counter-clockwise by turns[i] (N,) quarter turns (torch.rot90).

    Every rotation of the whole batch is taken and the right one kept per image: a few cheap copies, and no
    data-dependent indexing that would wait for the device. Odd turns need square images.
    """
    turns = (turns % 4)[:, None, None, None]  # (N, 1, 1, 1)
    if x.shape[-1] != x.shape[-2]:
        if bool((turns % 2).any()):
            raise ConfigError(f"quarter turns need square images (got {x.shape[-2]}x{x.shape[-1]})")
        return torch.where(turns == 2, x.flip(-2, -1), x)
    out = x
    for k in (1, 2, 3):
        out = torch.where(turns == k, torch.rot90(x, k, (-2, -1)), out)
    return out


def grid_corners(origin: Tensor, step: int, shifts: Tensor) -> Tensor:
    """Top-left (row, col) corners (N, 9, 2) of a 3x3 grid of patches, cells in raster order.

    Cell (r, c) of image n sits at origin[n] + (r, c) * step + shifts[n, 3r + c]: origin (N, 2), shifts
    (N, 9, 2) (each patch's own jitter).
    """
    cells = torch.arange(3, device=origin.device) * step  # (3,)
    grid = torch.stack(torch.meshgrid(cells, cells, indexing="ij"), dim=-1).reshape(9, 2)  # (9, 2)
    return origin[:, None, :] + grid + shifts


def crop_patches(x: Tensor, corners: Tensor, side: int) -> Tensor:
    """Square patches (N, K, C, side, side) of x (N, C, H, W) at top-left corners (N, K, 2) (row, col)."""
    offsets = torch.arange(side, device=x.device)  # (side,)
    rows = corners[..., 0, None] + offsets  # (N, K, side)
    cols = corners[..., 1, None] + offsets
    n = torch.arange(x.shape[0], device=x.device)[:, None, None, None]  # (N, 1, 1, 1)
    pixels = x.permute(0, 2, 3, 1)[n, rows[..., :, None], cols[..., None, :]]  # (N, K, side, side, C)
    return pixels.permute(0, 1, 4, 2, 3)


def fit_patches(patches: Tensor, scale: float = 1.0, min_side: int = MIN_PATCH_SIDE) -> Tensor:
    """Patches (M, C, p, p) as the backbone takes them: resized to max(round(scale * p), min_side) px."""
    side = max(round(scale * patches.shape[-1]), min_side)
    if side == patches.shape[-1]:
        return patches
    return F.interpolate(patches, size=(side, side), mode="bilinear", antialias=True)


def relpos_geometry(
    side: int, patch_fraction: float, gap_fraction: float, jitter_fraction: float
) -> tuple[int, int, int]:
    """(patch, gap, jitter) in pixels for images of `side` px: each fraction of the side, rounded down.

    With 3 * patch_fraction + 2 * gap_fraction + 2 * jitter_fraction <= 1 the jittered grid always fits.
    """
    patch, gap, jitter = (int(f * side) for f in (patch_fraction, gap_fraction, jitter_fraction))
    if patch < 1:
        raise ConfigError(f"patch_fraction {patch_fraction} leaves no pixel of a {side}-px image")
    if 3 * patch + 2 * gap + 2 * jitter > side:
        raise ConfigError(
            f"3 patches of {patch} px, 2 gaps of {gap} px and a jitter of {jitter} px each side "
            f"do not fit in {side} px"
        )
    return patch, gap, jitter


def jigsaw_geometry(side: int, tile_fraction: float) -> tuple[int, int]:
    """(cell, tile) in pixels: a 3x3 grid of `side // 3` px cells, each holding a tile_fraction-wide tile."""
    cell = side // 3
    tile = int(tile_fraction * cell)
    if tile < 1:
        raise ConfigError(f"tile_fraction {tile_fraction} leaves no pixel of a {cell}-px cell")
    return cell, tile


def normalize_patches(patches: Tensor, eps: float = 1e-5) -> Tensor:
    """Each patch (..., C, p, p) to zero mean and unit std over its pixels and channels (Noroozi Sec. 3.3)."""
    flat = patches.flatten(-3)
    mean = flat.mean(-1)[..., None, None, None]
    std = flat.std(-1)[..., None, None, None]
    return (patches - mean) / (std + eps)


def drop_color_channels(patches: Tensor, keep: Tensor, noise: Tensor) -> Tensor:
    """Doersch et al. Sec. 3.1 'color dropping': keep channel keep[m] (M,) of patch m (M, C, p, p).

    The other channels become Gaussian noise `noise` (M, C, p, p, standard normal) scaled to 1/100 of the
    kept channel's std. On normalised (mean-subtracted) views the noise is centred on the channel mean.
    """
    m, c = patches.shape[:2]
    kept = patches[torch.arange(m, device=patches.device), keep]  # (M, p, p)
    sigma = kept.flatten(1).std(1)[:, None, None, None] / 100  # (M, 1, 1, 1)
    mask = F.one_hot(keep, c).bool()[:, :, None, None]  # (M, C, 1, 1)
    return torch.where(mask, patches, noise * sigma)


def project_out_green_magenta(pixels: Tensor) -> Tensor:
    """Doersch et al. Sec. 3.1 'projection': RGB pixels (..., 3, H, W) times B = I - a^T a / (a a^T).

    a = (-1, 2, -1) is the green-magenta colour axis; greys are left unchanged.
    """
    a = pixels.new_tensor([-1.0, 2.0, -1.0]) / math.sqrt(6.0)  # (3,) unit green-magenta axis
    along = (pixels * a[:, None, None]).sum(-3, keepdim=True)  # (..., 1, H, W)
    return pixels - along * a[:, None, None]


def all_permutations(elements: int) -> Tensor:
    """Every permutation of range(elements) (elements!, elements) int8, in lexicographic order."""
    return torch.from_numpy(_all_permutations(elements).copy())


@functools.lru_cache(maxsize=2)
def _all_permutations(elements: int) -> np.ndarray:
    table = np.array(list(itertools.permutations(range(elements))), dtype=np.int8)
    table.flags.writeable = False
    return table


def hamming_distances(a: Tensor, b: Tensor) -> Tensor:
    """Number of positions where permutations differ: a (P, n), b (Q, n) -> (P, Q)."""
    return (a[:, None, :] != b[None, :, :]).sum(-1)


@functools.lru_cache(maxsize=8)
def maximal_hamming_permutations(
    size: int, seed: int = 0, criterion: str = "mean", elements: int = 9
) -> Tensor:
    """Noroozi & Favaro's greedy permutation set (Algorithm 1): (size, elements) int64, cached; do not modify.

    Start from a uniformly drawn permutation (a generator seeded with `seed`), then repeatedly add the one of
    all elements! permutations farthest from the chosen set: with criterion "mean" the one with the largest
    summed Hamming distance to the chosen ones (Algorithm 1's D-bar = 1^T D, ties to the first in
    lexicographic order), with "min" the one with the largest minimum distance (farthest-point sampling).
    Computed with numpy: a few hundred single-threaded passes over the 9! candidates take well under a second,
    where torch's threaded kernels stall on a busy machine.
    """
    if criterion not in ("mean", "min"):
        raise ConfigError(f"permutation criterion must be mean or min (got {criterion!r})")
    candidates = _all_permutations(elements)  # (n!, n)
    count = len(candidates)
    if not 1 <= size <= count:
        raise ConfigError(f"a permutation set of {elements} elements has 1 to {count} members")
    columns = np.ascontiguousarray(candidates.T)  # (n, n!): one position of every candidate per row
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(count, (1,), generator=generator))]
    taken = np.zeros(count, dtype=bool)
    score = np.zeros(count, dtype=np.int32)  # summed or minimum distance to the chosen set
    for index in range(1, size + 1):
        j = chosen[-1]
        taken[j] = True
        matches = np.zeros(count, dtype=np.int32)
        for position, value in enumerate(candidates[j].tolist()):
            matches += columns[position] == value
        distance = elements - matches  # (n!,) Hamming distance to the newest member
        if criterion == "mean":
            score += distance
        else:
            score = distance if index == 1 else np.minimum(score, distance)
        if index < size:
            chosen.append(int(np.where(taken, -1, score).argmax()))  # the first of the farthest
    return torch.from_numpy(candidates[chosen].astype(np.int64))


def input_channels(backbone: torch.nn.Module) -> int:
    """Channels of the images a backbone takes: those of its first convolution (every built-in has one)."""
    for module in backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    raise ConfigError(f"cannot tell how many image channels {type(backbone).__name__} takes (no convolution)")


# --- colourisation (Zhang, Isola & Efros 2016) -------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def ab_bins(bin_size: float = 10.0, levels: int = 64) -> Tensor:
    """Centres (Q, 2) of the in-gamut ab bins, float32, cached; do not modify.

    A bin is a point of the `bin_size` lattice on the (a, b) plane (cells centred on multiples of bin_size);
    it is kept when it is the nearest lattice point of some sRGB colour of a dense `levels`^3 grid of the RGB
    cube, in raster order of (a, b). bin_size 10 keeps Q = 261 bins over a in [-90, 100], b in [-110, 90]; the
    paper keeps Q = 313 over the same range (its criterion keeps more bins along the gamut's edge).
    """
    from sslab.augment.color_space import rgb_to_lab  # the augment package imports no method code

    axis = torch.linspace(0, 1, levels, dtype=torch.float64)
    rgb = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, levels, levels * levels)
    ab = rgb_to_lab(rgb)[1:].reshape(2, -1)  # (2, levels^3)
    cells = torch.unique((ab / bin_size).round().long(), dim=1)  # (2, Q), sorted by a then b
    return (cells.T.double() * bin_size).float()


def soft_encode(ab: Tensor, bins: Tensor, neighbours: int = 5, sigma: float = 5.0) -> Tensor:
    """Zhang et al. Sec. 2.1 soft-encoding: ab (N, 2, H, W) -> Z (N, Q, H, W) over bins (Q, 2).

    Each pixel's mass goes to its `neighbours` nearest bins, weighted by a Gaussian of width sigma (ab units)
    of the distance to them and normalised to sum to 1.
    """
    if ab.ndim != 4 or ab.shape[1] != 2:
        raise ValueError(f"soft_encode needs ab maps (N, 2, H, W), got {tuple(ab.shape)}")
    if not 1 <= neighbours <= bins.shape[0] or sigma <= 0:
        raise ValueError(f"need 1 <= neighbours <= {bins.shape[0]} and sigma > 0")
    n, _, h, w = ab.shape
    points = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()  # (P, 2)
    d2 = torch.cdist(points, bins.to(points)).square()  # (P, Q)
    near_d2, near = d2.topk(neighbours, dim=1, largest=False)  # (P, k)
    weights = torch.softmax(-near_d2 / (2 * sigma**2), dim=1)  # (P, k), sums to 1
    z = torch.zeros_like(d2).scatter_(1, near, weights)  # (P, Q)
    return z.view(n, h, w, -1).permute(0, 3, 1, 2)  # (N, Q, H, W)


def smooth_prior(prior: Tensor, bins: Tensor, sigma: float = 5.0) -> Tensor:
    """Zhang et al. Sec. 2.2: the empirical bin distribution p (Q,) smoothed by a Gaussian (sigma, ab units).

    Each bin's mass is spread over the bins by a Gaussian of the distance between their centres (the spread
    normalised per bin, so no mass is lost), giving p-tilde (Q,), summing to 1.
    """
    if prior.shape != bins.shape[:1] or sigma <= 0:
        raise ValueError(f"need a prior (Q,) for bins (Q, 2) and sigma > 0, got {tuple(prior.shape)}")
    kernel = torch.exp(-torch.cdist(bins, bins).square() / (2 * sigma**2)).to(prior)  # (Q, Q), symmetric
    smoothed = (kernel / kernel.sum(0, keepdim=True)) @ prior  # column r spreads p_r
    return smoothed / smoothed.sum()


def rebalance_weights(smoothed: Tensor, lam: float = 0.5) -> Tensor:
    """Zhang et al. eq. 4: w proportional to ((1 - lambda) p-tilde + lambda / Q)^-1, with E_p-tilde[w] = 1."""
    if smoothed.ndim != 1 or not 0 <= lam <= 1:
        raise ValueError("rebalance_weights needs a smoothed prior (Q,) and 0 <= lambda <= 1")
    q = smoothed.shape[0]
    w = ((1 - lam) * smoothed + lam / q).reciprocal()  # (Q,)
    return w / (smoothed * w).sum()


def colorization_loss(logits: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Zhang et al. eq. 2, averaged over cells: -v(Z) sum_q Z_q log softmax(logits)_q.

    logits, target: (N, Q, H, W), target Z a distribution over the Q bins per cell; weights: (N, H, W) the
    rebalancing weight v of each cell (None: 1).
    """
    if logits.shape != target.shape or logits.ndim != 4:
        raise ValueError(
            f"need logits and target (N, Q, H, W), got {tuple(logits.shape)}, {tuple(target.shape)}"
        )
    cross = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)  # (N, H, W)
    if weights is not None:
        cross = cross * weights
    return cross.mean()


# --- inpainting (Pathak et al. 2016) -----------------------------------------------------------------------


def center_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the central box whose sides are `fraction` of the image's."""
    box_h, box_w = round(fraction * height), round(fraction * width)
    if not (1 <= box_h <= height and 1 <= box_w <= width):
        raise ConfigError(f"mask_fraction {fraction} gives no box inside {height}x{width} images")
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def box_masks(boxes: Tensor, height: int, width: int, overlap_px: int) -> tuple[Tensor, Tensor]:
    """Masks of K boxes (N, K, 4) [top, left, height, width] per image: (filled, predicted) (N, 1, H, W).

    `predicted` is the union of the boxes, the region the decoder is scored on; `filled` is the union of the
    boxes shrunk by overlap_px on every side, the part hidden from the encoder (Pathak et al.'s overlapPred:
    the border of the predicted region overlaps the visible context).
    """
    rows = torch.arange(height, device=boxes.device)[None, None, :]  # (1, 1, H)
    cols = torch.arange(width, device=boxes.device)[None, None, :]  # (1, 1, W)
    top, left, box_h, box_w = (boxes[..., i, None] for i in range(4))  # (N, K, 1) each

    def union(shrink: int) -> Tensor:
        in_rows = (rows >= top + shrink) & (rows < top + box_h - shrink)  # (N, K, H)
        in_cols = (cols >= left + shrink) & (cols < left + box_w - shrink)  # (N, K, W)
        return (in_rows[..., :, None] & in_cols[..., None, :]).any(1, keepdim=True)  # (N, 1, H, W)

    return union(overlap_px), union(0)


def overlap_weights(filled: Tensor, predicted: Tensor, overlap_weight: float = 10.0) -> Tensor:
    """Per-pixel weights of the reconstruction loss (N, 1, H, W): 1 on the hidden pixels, `overlap_weight`
    on the predicted border that overlaps the context (Pathak et al.'s code: 10x), 0 elsewhere."""
    ring = predicted & ~filled
    return filled.float() + ring.float() * overlap_weight


def inpaint_loss(prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Pathak et al. eq. 1, the weighted L2 of the predicted region: sum w (x-hat - x)^2 / (C * #region).

    prediction, target: (N, C, H, W); weights (N, 1, H, W), > 0 exactly on the predicted region. As in the
    official code the mean is over the region's values and the border weight scales its pixels' terms.
    """
    if prediction.shape != target.shape or weights.shape != (target.shape[0], 1, *target.shape[2:]):
        raise ValueError(
            f"need prediction, target (N, C, H, W) and weights (N, 1, H, W), got {tuple(prediction.shape)}, "
            f"{tuple(target.shape)}, {tuple(weights.shape)}"
        )
    region = (weights > 0).sum() * target.shape[1]
    squared = (prediction.float() - target.float()).square() * weights  # (N, C, H, W)
    return squared.sum() / region.clamp_min(1)


# --- Exemplar-CNN (Dosovitskiy et al. 2014) ----------------------------------------------------------------


def surrogate_classes(num_images: int, classes: int, seed: int) -> Tensor:
    """Surrogate class of each training image (num_images,) int64: min(classes, num_images) images drawn
    without replacement (a generator seeded with `seed`) get classes 0, 1, ...; the others -1 (unused)."""
    if num_images < 1 or classes < 1:
        raise ValueError(f"need num_images >= 1 and classes >= 1, got {num_images}, {classes}")
    chosen = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:classes]
    mapping = torch.full((num_images,), -1, dtype=torch.long)
    mapping[chosen] = torch.arange(len(chosen))
    return mapping


def exemplar_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy of the surrogate-class logits (M, K) on labels (M,), over the rows with a label >= 0.

    A batch without any labelled row gives 0 (with the logits' gradient graph, so backward still runs).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (M, K) and labels (M,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    used = labels >= 0
    if not bool(used.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[used].float(), labels[used])
