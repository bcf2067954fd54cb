"""Colourisation, Context Encoders and Exemplar-CNN: the Lab conversion, each loss against a slow reference,
the masks and class maps, the methods' forward passes and short real trainings."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from steps import step_context

from sslab.augment.color_space import rgb_to_lab, rgb_to_lab_unit
from sslab.augment.view import parse_view
from sslab.config import from_mapping
from sslab.errors import AugmentError, ConfigError
from sslab.methods.base import Method, build_method
from sslab.methods.pretext_ops import (
    ab_bins,
    box_masks,
    center_box,
    colorization_loss,
    exemplar_loss,
    inpaint_loss,
    overlap_weights,
    rebalance_weights,
    smooth_prior,
    soft_encode,
    surrogate_classes,
)
from sslab.models import build_backbone
from sslab.runner import run_trial
from sslab.store import Store

N, SIDE = 8, 16


def make(method: str, channels: int, **fields: Any) -> Method:
    config = from_mapping({"method": method, "batch_size": N, **fields})
    torch.manual_seed(0)
    return build_method(config, build_backbone("smallcnn", channels, SIDE), num_classes=10)


# ------------------------------------------------------------------------------------ sRGB -> CIE Lab


def lab_reference(r: float, g: float, b: float) -> tuple[float, float, float]:
    """One pixel, written out from the sRGB and CIE definitions with the published D65 white point."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = linear(r), linear(g), linear(b)
    x = 0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl
    y = 0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl
    z = 0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl

    def f(t: float) -> float:
        eps, kappa = 216 / 24389, 24389 / 27  # the CIE constants in their exact-fraction form
        return t ** (1 / 3) if t > eps else (kappa * t + 16) / 116

    fx, fy, fz = f(x / 0.95047), f(y / 1.0), f(z / 1.08883)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def test_lab_matches_a_slow_per_pixel_reference() -> None:
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    x[0, :, 0, 0] = 0.01  # below the sRGB linear threshold
    x[0, :, 0, 1] = 0.001  # and the CIE f() one (t < (6/29)^3)
    lab = rgb_to_lab(x)
    assert lab.shape == x.shape
    for n in range(2):
        for i in range(5):
            for j in range(7):
                expected = lab_reference(*x[n, :, i, j].tolist())
                assert lab[n, :, i, j].tolist() == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
        ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
        ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
        ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
    ],
)
def test_lab_known_values(rgb: tuple[float, float, float], lab: tuple[float, float, float]) -> None:
    pixel = torch.tensor(rgb).view(1, 3, 1, 1)
    assert rgb_to_lab(pixel).flatten().tolist() == pytest.approx(lab, abs=2e-3)


def test_lab_op_scales_into_unit_range_and_refuses_grey_images() -> None:
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    lab = rgb_to_lab(x)
    expected = torch.stack([lab[:, 0] / 100, (lab[:, 1] + 128) / 255, (lab[:, 2] + 128) / 255], dim=1)
    out = parse_view("lab")(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(
        rgb_to_lab_unit(x), expected, atol=1e-6
    )
    red = parse_view("lab")(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1), torch.Generator())
    assert red.flatten().tolist() == pytest.approx([0.532408, 208.0925 / 255, 195.2032 / 255], abs=1e-5)
    with pytest.raises(AugmentError, match=r"^lab: needs RGB images \(3 channels\), got 1 channel\(s\)$"):
        parse_view("lab")(torch.rand(2, 1, 6, 6), torch.Generator())


# ---------------------------------------------------------------------------------------- colourisation


def test_ab_bins_are_the_in_gamut_lattice_points() -> None:
    bins = ab_bins(10.0)
    assert 250 <= len(bins) <= 320  # the paper: 313 for bins of side 10
    assert len(torch.unique(bins, dim=0)) == len(bins) and torch.equal(bins, (bins / 10).round() * 10)
    assert bins[:, 0].min() == -90 and bins[:, 0].max() == 100  # a of sRGB: about -86 to 98
    assert bins[:, 1].min() == -110 and bins[:, 1].max() == 90  # b: about -108 to 95
    primaries = torch.eye(3).T.reshape(1, 3, 1, 3)  # red, green, blue and grey all have their bin
    for ab in [*rgb_to_lab(primaries)[0, 1:, 0].T, torch.zeros(2)]:
        assert ((bins - (ab / 10).round() * 10).abs().sum(1) == 0).any()
    assert len(ab_bins(20.0)) < len(bins) < len(ab_bins(5.0))


def soft_encode_reference(a: float, b: float, bins: torch.Tensor, k: int, sigma: float) -> list[float]:
    distances = [math.dist((a, b), bin_ab) for bin_ab in bins.tolist()]
    nearest = sorted(range(len(distances)), key=distances.__getitem__)[:k]
    weights = {q: math.exp(-(distances[q] ** 2) / (2 * sigma**2)) for q in nearest}
    total = sum(weights.values())
    return [weights.get(q, 0.0) / total for q in range(len(distances))]


def test_soft_encoding_sums_to_one_over_five_bins_and_peaks_at_the_nearest() -> None:
    bins = ab_bins(10.0)
    ab = torch.tensor([[3.0, -4.0], [47.0, 12.5], [-80.0, -100.0]]).T.reshape(1, 2, 1, 3)  # three pixels
    z = soft_encode(ab, bins)  # (1, Q, 1, 3)
    assert z.shape == (1, len(bins), 1, 3)
    for pixel in range(3):
        a, b = ab[0, :, 0, pixel].tolist()
        weights = z[0, :, 0, pixel]
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-6) and int((weights > 0).sum()) == 5
        nearest = int(torch.cdist(torch.tensor([[a, b]]), bins).argmin())
        assert int(weights.argmax()) == nearest
        assert weights.tolist() == pytest.approx(soft_encode_reference(a, b, bins, 5, 5.0), abs=1e-6)


def test_prior_smoothing_keeps_mass_and_follows_a_gaussian() -> None:
    bins = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [0.0, 10.0]])
    delta = torch.tensor([1.0, 0.0, 0.0, 0.0])
    smoothed = smooth_prior(delta, bins, sigma=5.0)
    g = [math.exp(-(d**2) / 50) for d in (0.0, 10.0, 20.0, 10.0)]  # Gaussian of sigma 5 around bin 0
    assert smoothed.tolist() == pytest.approx([v / sum(g) for v in g], rel=1e-5)
    prior = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert smooth_prior(prior, bins).sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_rebalancing_weights_have_expectation_one_under_the_smoothed_prior(lam: float) -> None:
    prior = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(2)) * 2, 0)
    w = rebalance_weights(prior, lam)
    assert (prior * w).sum().item() == pytest.approx(1.0, abs=1e-6)
    expected = [1 / ((1 - lam) * p + lam / 50) for p in prior.tolist()]  # eq. 4 before normalising
    scale = 1 / sum(p * e for p, e in zip(prior.tolist(), expected, strict=True))
    assert w.tolist() == pytest.approx([e * scale for e in expected], rel=1e-5)
    if lam == 1.0:
        assert torch.allclose(w, torch.ones(50))
    if lam < 1.0:  # rare colours weigh more
        assert w[prior.argmin()] > w[prior.argmax()]


def test_colorization_loss_matches_a_hand_computation() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]).T.reshape(1, 3, 1, 2)  # two cells, Q = 3
    target = torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.0, 0.5]]).T.reshape(1, 3, 1, 2)
    weights = torch.tensor([2.0, 0.5]).view(1, 1, 2)
    expected = 0.0
    for cell, v in enumerate((2.0, 0.5)):
        scores = logits[0, :, 0, cell].tolist()
        log_norm = math.log(sum(math.exp(s) for s in scores))
        expected += -v * sum(
            t * (s - log_norm) for t, s in zip(target[0, :, 0, cell].tolist(), scores, strict=True)
        )
    assert colorization_loss(logits, target, weights).item() == pytest.approx(expected / 2, rel=1e-6)
    unweighted = colorization_loss(logits, target)
    manual = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert unweighted.item() == pytest.approx(manual.item(), rel=1e-6)


def test_colorize_refuses_grey_datasets_with_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"^colorize needs colour images \(3 channels\); this dataset has 1$"
    ):
        make("colorize", 1)


def test_colorize_feeds_the_backbone_lightness_and_scores_pooled_soft_targets() -> None:
    method = make("colorize", 3)
    mean, std = (
        torch.tensor([0.4, 0.5, 0.3]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1),
    )
    rgb = torch.rand(N, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    seen: list[torch.Tensor] = []
    method.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    method.train()
    context = step_context(rows=N, mean=mean, std=std)
    out = method([(rgb - mean) / std, (rgb - mean) / std], torch.zeros(N, dtype=torch.long), context)
    grey = seen[0] * std + mean  # the backbone's input back in [0, 1]
    lightness = rgb_to_lab(rgb)[:, :1] / 100
    assert torch.allclose(grey, lightness.expand(-1, 3, -1, -1), atol=1e-5)
    # the loss, from the pieces: targets pooled to the 8 x 8 grid, weights from this batch's prior alone
    with torch.no_grad():  # train mode, the same batch: the same batch-norm statistics
        logits = method.decoder(method.backbone(seen[0]))
    z = soft_encode(F.adaptive_avg_pool2d(rgb_to_lab(rgb)[:, 1:], 8), method.bins)
    prior = z.sum(dim=(0, 2, 3)) / z.sum()
    w = rebalance_weights(smooth_prior(prior, method.bins), 0.5)
    expected = colorization_loss(logits, z, w[z.argmax(1)])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert method.counts.sum().item() == pytest.approx(N * 64, rel=1e-6)  # one unit of mass per cell
    out.loss.backward()
    assert all(p.grad is not None for p in method.backbone.parameters())


# ---------------------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize(
    ("side", "fraction", "box"),
    [
        (128, 0.5, (32, 32, 64, 64)),
        (32, 0.5, (8, 8, 16, 16)),
        (28, 0.5, (7, 7, 14, 14)),
        (10, 0.3, (3, 3, 3, 3)),
    ],
)
def test_center_box_bounds(side: int, fraction: float, box: tuple[int, int, int, int]) -> None:
    assert center_box(side, side, fraction) == box
    with pytest.raises(ConfigError, match="mask_fraction"):
        center_box(side, side, 0.001)


def test_center_masks_match_the_official_code_at_128_px() -> None:
    # train.lua fills rows and columns 1 + 32 + 4 .. 64 + 32 - 4 (1-based, inclusive) of the 128 px crop; the
    # decoder predicts the central 64 x 64, whose 4-pixel border gets 10x the loss weight.
    boxes = torch.tensor([[[32, 32, 64, 64]]])
    filled, predicted = box_masks(boxes, 128, 128, overlap_px=4)
    expected_filled = torch.zeros(1, 1, 128, 128, dtype=torch.bool)
    expected_filled[..., 36:92, 36:92] = True
    expected_predicted = torch.zeros_like(expected_filled)
    expected_predicted[..., 32:96, 32:96] = True
    assert torch.equal(filled, expected_filled) and torch.equal(predicted, expected_predicted)
    weights = overlap_weights(filled, predicted, 10.0)
    assert weights[0, 0, 36, 36] == 1 and weights[0, 0, 35, 50] == 10 and weights[0, 0, 32, 32] == 10
    assert weights[0, 0, 31, 50] == 0 and weights[0, 0, 96, 50] == 0 and weights[0, 0, 95, 95] == 10
    assert int((weights == 10).sum()) == 64 * 64 - 56 * 56 and int((weights == 1).sum()) == 56 * 56


def test_box_masks_take_the_union_of_overlapping_boxes() -> None:
    boxes = torch.tensor([[[0, 0, 4, 4], [2, 2, 4, 4]]])  # two 4 x 4 boxes overlapping in a 2 x 2 square
    filled, predicted = box_masks(boxes, 8, 8, overlap_px=1)
    assert int(predicted.sum()) == 16 + 16 - 4
    assert int(filled.sum()) == 4 + 4 and bool(filled[0, 0, 1, 1]) and bool(filled[0, 0, 4, 4])
    assert not bool(filled[0, 0, 0, 0]) and bool(predicted[0, 0, 0, 0])


def test_inpaint_loss_matches_a_hand_computation() -> None:
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])  # (2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    weights = torch.tensor([[[[1.0, 10.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    # predicted region: 3 pixels; sum w d^2 = 1 * 1 + 10 * 4 + 1 * 1
    assert inpaint_loss(prediction, target, weights).item() == pytest.approx(42 / 3)
    two_channels = inpaint_loss(prediction.repeat(1, 2, 1, 1), target.repeat(1, 2, 1, 1), weights)
    assert two_channels.item() == pytest.approx(84 / 6)  # the mean is over the region's values
    with pytest.raises(ValueError, match="weights"):
        inpaint_loss(prediction, target, weights[:, :, :1])


def test_inpaint_hides_the_centre_and_scores_the_painted_region() -> None:
    method = make("inpaint", 1, overlap_px=1, overlap_weight=10.0)
    x = torch.randn(N, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(4))
    seen: list[torch.Tensor] = []
    method.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    method.train()
    out = method([x, x.clone()], torch.zeros(N, dtype=torch.long), step_context(rows=N))
    hidden = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    hidden[5:11, 5:11] = True  # the central 8 x 8 of 16 px (rows 4..11) less a 1-pixel border
    assert torch.equal(seen[0][:, :, hidden], torch.zeros_like(seen[0][:, :, hidden]))
    assert torch.equal(seen[0][:, :, ~hidden], x[:, :, ~hidden])
    with torch.no_grad():
        painted = F.interpolate(method.decoder(method.backbone(seen[0])), size=(SIDE, SIDE), mode="bilinear")
    d2 = (painted - x).square()[:, 0]  # (N, H, W)
    ring = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    ring[4:12, 4:12] = True
    ring &= ~hidden
    expected = (d2[:, hidden].sum() + 10 * d2[:, ring].sum()) / (N * 64)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_random_blocks_fall_inside_the_image_and_hide_at_most_the_centres_area() -> None:
    method = make("inpaint", 1, mask="random_block", overlap_px=0)
    torch.manual_seed(5)
    boxes = method.boxes(64, 28, 28, torch.device("cpu"))  # (64, 4, 4)
    assert boxes.shape == (64, 4, 4) and (boxes[..., 2:] == 7).all()  # half the centre's 14 px side
    assert (boxes[..., :2] >= 0).all() and (boxes[..., :2] + 7 <= 28).all()
    filled, predicted = box_masks(boxes, 28, 28, 0)
    area = filled.flatten(1).sum(1)
    assert torch.equal(filled, predicted) and (area <= 14 * 14).all() and (area >= 49).all()
    assert len(torch.unique(boxes[:, :, :2].reshape(-1, 2), dim=0)) > 100  # the places vary
    x = torch.randn(N, 1, SIDE, SIDE)
    method.train()
    out = method([x, x], torch.zeros(N, dtype=torch.long), step_context(rows=N))
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0


# ------------------------------------------------------------------------------------------ Exemplar-CNN


def test_surrogate_classes_are_deterministic_and_cover_the_chosen_images() -> None:
    mapping = surrogate_classes(100, 30, seed=7)
    assert torch.equal(mapping, surrogate_classes(100, 30, seed=7))
    assert not torch.equal(mapping, surrogate_classes(100, 30, seed=8))
    chosen = mapping >= 0
    assert int(chosen.sum()) == 30 and sorted(mapping[chosen].tolist()) == list(range(30))
    everyone = surrogate_classes(20, 8000, seed=0)  # more classes than images: every image is one
    assert sorted(everyone.tolist()) == list(range(20))


def test_exemplar_loss_is_cross_entropy_on_the_labelled_rows() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(6), requires_grad=True)
    labels = torch.tensor([2, -1, 0, 3, -1, 1])
    with torch.no_grad():
        expected = sum(-F.log_softmax(logits[i], 0)[labels[i]].item() for i in (0, 2, 3, 5)) / 4
    assert exemplar_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    none = exemplar_loss(logits, torch.full((6,), -1))
    none.backward()
    assert none.item() == 0.0 and logits.grad is not None


def test_exemplar_classifies_both_views_into_the_images_surrogate_class() -> None:
    method = make("exemplar", 1, classes=20, seed=3)
    views = [torch.randn(N, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    indices = torch.tensor([0, 5, 17, 33, 41, 48, 2, 60])
    method.train()
    out = method(
        views, torch.zeros(N, dtype=torch.long), step_context(indices=indices, num_images=64, rows=N)
    )
    mapping = surrogate_classes(64, 20, seed=3)
    assert torch.equal(method.surrogate, mapping)
    with torch.no_grad():
        logits = method.head(method.backbone(torch.cat(views)))  # (2N, 20)
    target = torch.cat([mapping[indices], mapping[indices]])
    used = target >= 0
    assert 0 < int(used.sum()) < 2 * N  # some rows of the batch are outside the 20 chosen images
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits[used], target[used]).item(), rel=1e-5)
    assert out.embedding.shape == (N, method.backbone.feature_dim)


# ------------------------------------------------------------------------------ short real pretrainings

# Probe margins over the random-init baseline, measured with these very runs (3000 embedded images or the 1000
# synthetic ones, 2 epochs, each method's defaults), seed 0 (seed 1): linear probe, inpaint +2.45 (+2.55),
# exemplar +2.65 (+4.5). On the synthetic shapes the linear probe of the random-init backbone already scores
# 99% (97.5%), and colorize's is 99% (98.5%): no room to show a gain, so colorize is held to its kNN margin,
# +6.5 (+10.0); on pipeline 2, exemplar +1.3 (+2.8). Each test asks for about half of its seed-0 margin.
MARGINS = {"inpaint": 0.012, "exemplar": 0.006, "colorize": 0.03}
METRIC = {"colorize": "knn_top1"}  # the others: linear_top1
DATA = {"colorize": {"dataset": "synthetic"}}  # colour needs colour images; the embedded set is grey


@pytest.mark.parametrize("method", list(MARGINS))
def test_short_pretraining_beats_random_init(method: str, tmp_path) -> None:
    fields = {"method": method, "train_subset": 3000, "epochs": 2, "seed": 0, **DATA.get(method, {})}
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    outcome = run_trial(from_mapping(fields), store, checkpoint_dir=tmp_path)
    metric = METRIC.get(method, "linear_top1")
    margin = outcome.metrics[metric] - outcome.metrics[f"baseline_{metric}"]
    assert margin > MARGINS[method], outcome.metrics
    assert outcome.status == "done" and outcome.collapsed is False
    losses = [m.value for m in store.metrics(outcome.trial_id) if m.name == "loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[1] < losses[0]


@pytest.mark.parametrize("mask", ["center", "random_block"])
def test_an_overlap_that_hides_nothing_is_a_one_line_error(mask: str) -> None:
    method = make("inpaint", 1, **{"inpaint.mask": mask, "inpaint.overlap_px": 8})
    x = torch.randn(2, 1, SIDE, SIDE)
    with pytest.raises(ConfigError, match="leaves nothing hidden"):
        method([x, x], torch.zeros(2, dtype=torch.long), step_context(rows=2))
