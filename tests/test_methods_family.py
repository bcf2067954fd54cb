"""VICReg, NNCLR, InvaSpread and CMC: their losses against slow references and hand-worked values, their
state, and short real trainings that must beat the random-init probe."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from steps import step_context

from sslab.augment.color_space import rgb_to_lab
from sslab.config import TrialConfig, from_mapping
from sslab.errors import ConfigError
from sslab.losses import (
    cmc_in_batch,
    cmc_nce,
    cmc_partition,
    cmc_softmax,
    invaspread_loss,
    invaspread_probabilities,
    nnclr_loss,
    nnclr_nearest_neighbour,
    vicreg_covariance,
    vicreg_loss,
    vicreg_terms,
    vicreg_variance,
)
from sslab.methods import method_info
from sslab.methods.base import Method, build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer
from sslab.runner import run_trial
from sslab.store import Store

N, SIDE = 16, 16
FAMILY = ("vicreg", "nnclr", "invaspread", "cmc")


def make(method: str, channels: int = 1, **fields: Any) -> Method:
    config = from_mapping({"method": method, "batch_size": N, **fields})
    torch.manual_seed(0)
    return build_method(config, build_backbone("smallcnn", channels, SIDE), num_classes=10)


def views(step: int, channels: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(N, channels, SIDE, SIDE, generator=generator) for _ in range(2)]


def train(method: Method, steps: int, channels: int = 1, num_images: int = 64) -> list[float]:
    optimizer = build_optimizer(method.config, method)
    method.train()
    losses = []
    for step in range(steps):
        context = step_context(step, steps, indices=torch.arange(step * N, (step + 1) * N) % num_images)
        out = method(views(step, channels), torch.zeros(N, dtype=torch.long), context)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        method.after_step(context)
        losses.append(out.loss.item())
    return losses


def test_registered_with_valid_paper_defaults() -> None:
    for name in FAMILY:
        info = method_info(name)
        assert info.paper
        config = from_mapping({"method": name})
        for key, value in info.shared_defaults.items():
            assert getattr(config, key) == value and getattr(TrialConfig, key) != value, key
        assert dict(config.settings) == info.defaults()
    assert [method_info(n).multiprocess for n in FAMILY] == [True, True, True, False]
    s = method_info("vicreg").defaults()
    assert (s["lambd"], s["mu"], s["nu"], s["gamma"], s["eps"]) == (25.0, 25.0, 1.0, 1.0, 1e-4)
    assert method_info("nnclr").defaults()["temperature"] == 0.1
    assert method_info("invaspread").defaults()["temperature"] == 0.1
    cmc = method_info("cmc").defaults()
    assert (cmc["negatives"], cmc["temperature"], cmc["bank_momentum"]) == (16384, 0.07, 0.5)


def test_compare_and_the_methods_study_take_them() -> None:
    from sslab.study import load_plan
    from sslab.study.compare import compare_configs

    configs = compare_configs(list(FAMILY), [0], {"dataset": "synthetic"})
    assert {(c.method, c.dataset) for c in configs.values()} == {(n, "synthetic") for n in FAMILY}
    in_study = {cell.config.method for cell in load_plan("methods", seeds=[0]).cells}
    assert {"vicreg", "nnclr", "invaspread"} <= in_study and "cmc" not in in_study  # its data is grey


# ------------------------------------------------------------------------------------------------ VICReg


def _vicreg_reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float, mu: float, nu: float) -> float:
    """The official code's loss written out with explicit loops (gamma = 1, eps = 1e-4)."""
    n, d = z1.shape
    a, b = z1.tolist(), z2.tolist()
    invariance = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def variance(z: list[list[float]]) -> float:
        total = 0.0
        for j in range(d):
            mean = sum(z[i][j] for i in range(n)) / n
            var = sum((z[i][j] - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + 1e-4))
        return total / d

    def covariance(z: list[list[float]]) -> float:
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        total = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    c = sum((z[i][j] - means[j]) * (z[i][k] - means[k]) for i in range(n)) / (n - 1)
                    total += c * c
        return total / d

    v = (variance(a) + variance(b)) / 2
    return lambd * invariance + mu * v + nu * (covariance(a) + covariance(b))


def test_vicreg_terms_hand_worked() -> None:
    # dimension 0 holds 0 and 2: unbiased variance 2, std above 1, no hinge; dimension 1 is constant:
    # std sqrt(1e-4) = 0.01, hinge 0.99; v = 0.99 / 2
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert vicreg_variance(z).item() == pytest.approx(0.495)
    assert vicreg_variance(z, gamma=2.0).item() == pytest.approx((2 - math.sqrt(2.0001) + 1.99) / 2)
    # perfectly correlated dimensions: C = [[2, 2], [2, 2]], off-diagonal squares 8, over d = 2
    assert vicreg_covariance(torch.tensor([[1.0, 1.0], [-1.0, -1.0]])).item() == pytest.approx(4.0)
    assert vicreg_covariance(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == 0.0
    s, v, c = vicreg_terms(z, z + 1.0)
    assert s.item() == pytest.approx(1.0) and v.item() == pytest.approx(0.495) and c.item() == 0.0


def test_vicreg_loss_matches_slow_reference_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 7, 5, generator=g, dtype=torch.float64) * 0.7
    expected = _vicreg_reference(z1, z2, 25.0, 25.0, 1.0)
    assert vicreg_loss(z1, z2).item() == pytest.approx(expected, rel=1e-10)
    assert vicreg_loss(z2, z1).item() == pytest.approx(expected, rel=1e-10)
    assert vicreg_loss(z1, z2, 2.0, 3.0, 0.5).item() == pytest.approx(
        _vicreg_reference(z1, z2, 2.0, 3.0, 0.5), rel=1e-10
    )
    with pytest.raises(ValueError, match="N >= 2"):
        vicreg_variance(torch.randn(1, 3))
    with pytest.raises(ValueError, match=">= 0"):
        vicreg_loss(z1, z2, lambd=-1.0)


def test_vicreg_gathered_pieces_equal_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    plain = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    whole = vicreg_loss(*plain)
    whole.backward()
    for world in (2, 4):
        n = 8 // world
        parts = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
        pieces = []
        for start in range(0, 8, n):
            processes = _BothViews(parts, start, world)
            pieces.append(
                vicreg_loss(parts[0][start : start + n], parts[1][start : start + n], processes=processes)
            )
        mean = torch.stack(pieces).mean()
        mean.backward()
        torch.testing.assert_close(mean, whole)
        torch.testing.assert_close(parts[0].grad, plain[0].grad)
        torch.testing.assert_close(parts[1].grad, plain[1].grad)


class _BothViews:
    """A gather for two views: each call returns the global batch of the view it is given rows of."""

    def __init__(self, full: list[torch.Tensor], start: int, world_size: int) -> None:
        self.full, self.start, self.world_size, self.rank = full, start, world_size, 0
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        view = self.full[self.calls % 2]
        self.calls += 1
        return torch.cat([view[: self.start], x, view[self.start + len(x) :]])

    def sum(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - VICReg gathers rows
        raise NotImplementedError


def test_vicreg_method_gathers_before_the_variance_and_covariance() -> None:
    vicreg = make("vicreg", head_width=32, out_dim=16)
    vicreg.train()
    x1, x2 = views(0)
    out = vicreg([x1, x2], torch.zeros(N, dtype=torch.long), step_context())
    z1, z2 = vicreg.head(vicreg.backbone(x1)), vicreg.head(vicreg.backbone(x2))  # per-view batch-norm
    assert out.loss.item() == pytest.approx(vicreg_loss(z1, z2).item(), rel=1e-5)
    assert torch.allclose(out.embedding, z1, atol=1e-5)


# ------------------------------------------------------------------------------------------------- NNCLR


def test_nnclr_nearest_neighbour_picks_the_known_row() -> None:
    support = torch.eye(3)  # unit rows e0, e1, e2
    z = torch.tensor([[0.1, 2.0, 0.0], [0.2, 0.1, 0.9], [5.0, -1.0, 1.0]])
    assert torch.equal(nnclr_nearest_neighbour(z, support), support[[1, 2, 0]])
    # against brute force: the smallest Euclidean distance between the normalised z and unit support rows
    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(20, 8, generator=g), F.normalize(torch.randn(50, 8, generator=g), dim=1)
    zn = F.normalize(z, dim=1)
    nearest = [min(range(50), key=lambda k: (zn[i] - q[k]).norm().item()) for i in range(20)]
    assert torch.equal(nnclr_nearest_neighbour(z.requires_grad_(), q), q[nearest])
    assert not nnclr_nearest_neighbour(z, q).requires_grad


def test_nnclr_loss_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(2)
    nn, p = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    t = 0.1
    a, b = F.normalize(nn, dim=1).tolist(), F.normalize(p, dim=1).tolist()
    terms = []
    for i in range(5):
        logits = [sum(x * y for x, y in zip(a[i], b[k], strict=True)) / t for k in range(5)]
        terms.append(-logits[i] + math.log(sum(math.exp(v) for v in logits)))
    assert nnclr_loss(nn, p, t).item() == pytest.approx(sum(terms) / 5, rel=1e-10)
    # symmetric as the method uses it: swapping the views leaves L(nn1, p2)/2 + L(nn2, p1)/2 unchanged
    nn2, p2 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    total = nnclr_loss(nn, p2) / 2 + nnclr_loss(nn2, p) / 2
    assert (nnclr_loss(nn2, p) / 2 + nnclr_loss(nn, p2) / 2).item() == pytest.approx(total.item())


def test_nnclr_loss_gathered_pieces_equal_the_whole_batch_and_nn_gets_no_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    nn, p = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    nn.requires_grad_()
    plain = p.clone().requires_grad_()
    whole = nnclr_loss(nn, plain, 0.2)
    whole.backward()
    assert nn.grad is None
    gathered = p.clone().requires_grad_()
    mean = torch.stack(
        [nnclr_loss(nn[s : s + 2], gathered[s : s + 2], 0.2, gathered, s) for s in (0, 2, 4, 6)]
    )
    mean.mean().backward()
    torch.testing.assert_close(mean.mean(), whole)
    torch.testing.assert_close(gathered.grad, plain.grad)
    with pytest.raises(ValueError, match="rank_offset"):
        nnclr_loss(nn[:2], p[:2], 0.2, p, 7)


def test_nnclr_support_set_is_a_queue_of_normalised_first_view_embeddings() -> None:
    nnclr = make("nnclr", queue_size=40, head_width=32, pred_width=16, out_dim=16)
    nnclr.train()
    assert int(nnclr.queue_filled) == 0
    x = views(0)
    z1 = nnclr.head(nnclr.backbone(torch.cat(x)))[:N].detach()  # what the step sees (both views, one batch)
    nnclr(x, torch.zeros(N, dtype=torch.long), step_context())
    # the very first lookup has no entries: each embedding is its own neighbour
    assert torch.allclose(nnclr.neighbours(z1), F.normalize(z1, dim=1))
    nnclr.after_step(step_context())
    assert int(nnclr.queue_filled) == N and int(nnclr.queue_next) == N
    assert torch.allclose(nnclr.queue[:N], F.normalize(z1, dim=1), atol=1e-5)
    assert nnclr.queue[N:].abs().sum() == 0
    # lookups see the written rows only: the empty (zero) rows are never a neighbour
    probe = -nnclr.queue[:N].sum(dim=0, keepdim=True)  # far from every written row
    assert nnclr.neighbours(probe).norm().item() == pytest.approx(1.0)
    train(nnclr, steps=3)  # 16 more rows, then 16 that wrap around the 40-row queue
    assert int(nnclr.queue_filled) == 40 and int(nnclr.queue_next) == (4 * N) % 40
    assert torch.allclose(nnclr.queue.norm(dim=1), torch.ones(40), atol=1e-5)
    restored = make("nnclr", queue_size=40, head_width=32, pred_width=16, out_dim=16)
    restored.load_state_dict(nnclr.state_dict())
    assert torch.equal(restored.queue, nnclr.queue) and int(restored.queue_next) == int(nnclr.queue_next)


def test_nnclr_without_predictor_contrasts_the_projections() -> None:
    nnclr = make("nnclr", predictor=False, head_width=32, out_dim=16)
    assert nnclr.predictor is None
    assert all(math.isfinite(v) for v in train(nnclr, steps=2))


# -------------------------------------------------------------------------------------------- InvaSpread


def _invaspread_reference(f: torch.Tensor, f_hat: torch.Tensor, t: float) -> float:
    """Eq. (8) of Ye et al. 2019 with explicit loops, divided by the batch size."""
    a, b = F.normalize(f, dim=1).tolist(), F.normalize(f_hat, dim=1).tolist()
    m = len(a)

    def dot(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    def p(i: int, anchor: list[float]) -> float:  # P(i | x) with the originals f_k as the weights
        return math.exp(dot(a[i], anchor) / t) / sum(math.exp(dot(a[k], anchor) / t) for k in range(m))

    total = -sum(math.log(p(i, b[i])) for i in range(m))
    total -= sum(math.log(1 - p(i, a[j])) for i in range(m) for j in range(m) if j != i)
    return total / m


def test_invaspread_probabilities_sum_to_one_and_the_hand_worked_case() -> None:
    g = torch.Generator().manual_seed(4)
    f, f_hat = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    p_hat, p = invaspread_probabilities(f, f_hat, 0.1)
    torch.testing.assert_close(p_hat.sum(dim=1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(p.sum(dim=1), torch.ones(6, dtype=torch.float64))
    # two orthogonal instances, each augmentation equal to its original, tau = 1:
    # P(i | x^_i) = e / (e + 1), P(i | x_j) = 1 / (e + 1), J / 2 = -2 log(e / (e + 1))
    eye = torch.eye(2, dtype=torch.float64)
    p_hat, p = invaspread_probabilities(eye, eye, 1.0)
    assert p_hat[0, 0].item() == pytest.approx(math.e / (math.e + 1))
    assert p[0, 1].item() == pytest.approx(1 / (math.e + 1))
    assert invaspread_loss(eye, eye, 1.0).item() == pytest.approx(-2 * math.log(math.e / (math.e + 1)))


def test_invaspread_loss_matches_slow_reference() -> None:
    g = torch.Generator().manual_seed(5)
    f, f_hat = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5):
        assert invaspread_loss(f, f_hat, t).item() == pytest.approx(
            _invaspread_reference(f, f_hat, t), rel=1e-9
        )


def test_invaspread_gathered_pieces_equal_the_whole_batch() -> None:
    g = torch.Generator().manual_seed(6)
    f, f_hat = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    plain = [f.clone().requires_grad_(), f_hat.clone().requires_grad_()]
    whole = invaspread_loss(*plain, 0.2)
    whole.backward()
    parts = [f.clone().requires_grad_(), f_hat.clone().requires_grad_()]
    losses = [invaspread_loss(parts[0][s : s + 4], parts[1][s : s + 4], 0.2, parts[0], s) for s in (0, 4)]
    mean = torch.stack(losses).mean()
    mean.backward()
    torch.testing.assert_close(mean, whole)
    torch.testing.assert_close(parts[0].grad, plain[0].grad)
    torch.testing.assert_close(parts[1].grad, plain[1].grad)


def test_invaspread_method_contrasts_the_second_view_against_the_first() -> None:
    inva = make("invaspread")
    inva.train()
    x = views(0)
    out = inva(x, torch.zeros(N, dtype=torch.long), step_context())
    f, f_hat = F.normalize(inva.head(inva.backbone(torch.cat(x))), dim=1).chunk(2)
    assert f.shape == (N, 128) and inva.head.layers[0][0].weight.shape == (128, 256)  # one linear layer
    assert out.loss.item() == pytest.approx(invaspread_loss(f, f_hat, 0.1).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------- CMC


def _nce_reference(scores: torch.Tensor, n_data: int, z: float, t: float) -> float:
    """The official NCECriterion with explicit loops: P = exp(s / T) / Z, positive in column 0."""
    rows = scores.tolist()
    m, noise = len(rows[0]) - 1, 1 / n_data
    total = 0.0
    for row in rows:
        p = [math.exp(s / t) / z for s in row]
        total += math.log(p[0] / (p[0] + m * noise))
        total += sum(math.log(m * noise / (q + m * noise)) for q in p[1:])
    return -total / len(rows)


def test_cmc_nce_and_softmax_match_slow_references() -> None:
    g = torch.Generator().manual_seed(7)
    scores_l, scores_ab = torch.rand(2, 4, 6, generator=g, dtype=torch.float64) * 2 - 1
    z_l, z_ab = cmc_partition(scores_l, 100, 0.07), cmc_partition(scores_ab, 100, 0.07)
    assert z_l == pytest.approx(100 * sum(math.exp(s / 0.07) for s in scores_l.flatten().tolist()) / 24)
    expected = _nce_reference(scores_l, 100, z_l, 0.07) + _nce_reference(scores_ab, 100, z_ab, 0.07)
    assert cmc_nce(scores_l, scores_ab, 100, z_l, z_ab, 0.07).item() == pytest.approx(expected, rel=1e-9)
    softmax = sum(
        -row[0] / 0.5 + math.log(sum(math.exp(s / 0.5) for s in row))
        for scores in (scores_l, scores_ab)
        for row in (r.tolist() for r in scores)
    )
    assert cmc_softmax(scores_l, scores_ab, 0.5).item() == pytest.approx(softmax / 4, rel=1e-9)


def test_cmc_in_batch_matches_slow_reference_is_symmetric_and_gathers() -> None:
    g = torch.Generator().manual_seed(8)
    z_l, z_ab = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    a, b = F.normalize(z_l, dim=1).tolist(), F.normalize(z_ab, dim=1).tolist()

    def one_way(x: list[list[float]], y: list[list[float]]) -> float:
        total = 0.0
        for i, row in enumerate(x):
            logits = [sum(p * q for p, q in zip(row, other, strict=True)) / 0.07 for other in y]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
        return total / len(x)

    expected = one_way(a, b) + one_way(b, a)
    assert cmc_in_batch(z_l, z_ab).item() == pytest.approx(expected, rel=1e-9)
    assert cmc_in_batch(z_ab, z_l).item() == pytest.approx(expected, rel=1e-9)
    plain = [z_l.clone().requires_grad_(), z_ab.clone().requires_grad_()]
    whole = cmc_in_batch(*plain)
    whole.backward()
    parts = [z_l.clone().requires_grad_(), z_ab.clone().requires_grad_()]
    losses = [cmc_in_batch(parts[0][s : s + 3], parts[1][s : s + 3], 0.07, *parts, s) for s in (0, 3)]
    torch.stack(losses).mean().backward()
    torch.testing.assert_close(torch.stack(losses).mean(), whole)
    torch.testing.assert_close(parts[0].grad, plain[0].grad)
    torch.testing.assert_close(parts[1].grad, plain[1].grad)


def test_cmc_refuses_grey_images_in_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        make("cmc", channels=1)
    assert "needs RGB images (3 channels)" in str(error.value) and "has 1;" in str(error.value)
    assert "\n" not in str(error.value)


def test_cmc_backbone_undoes_the_normalisation_and_splits_lab() -> None:
    cmc = make("cmc", channels=3, negatives=32)
    mean, std = (
        torch.tensor([0.3, 0.4, 0.5]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1),
    )
    pixels = torch.rand(N, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(9))
    cmc.train()
    cmc([(pixels - mean) / std] * 2, torch.zeros(N, dtype=torch.long), step_context(mean=mean, std=std))
    assert torch.equal(cmc.backbone.mean, mean) and torch.equal(cmc.backbone.std, std)
    lum, ab = cmc.backbone.split((pixels - mean) / std)
    lab = rgb_to_lab(pixels)
    torch.testing.assert_close(lum, (lab[:, :1] - 50) / 50, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ab[:, 0], (lab[:, 1] - 6.025) / 92.208, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ab[:, 1], (lab[:, 2] + 6.6895) / 101.1675, atol=1e-4, rtol=1e-4)
    white_l, white_ab = cmc.backbone.split((torch.ones(1, 3, 2, 2) - mean) / std)
    torch.testing.assert_close(white_l, torch.ones(1, 1, 2, 2), atol=1e-4, rtol=0)  # L = 100
    cmc.eval()
    features = cmc.backbone((pixels - mean) / std)  # what the probe sees: both encoders, concatenated
    assert features.shape == (N, cmc.backbone.feature_dim) == (N, 512)
    h_l, h_ab = cmc.backbone.encode((pixels - mean) / std)
    assert torch.allclose(features, torch.cat([h_l, h_ab], dim=1))
    assert (
        cmc.backbone.l_encoder.features[0].in_channels == 1
        and cmc.backbone.ab_encoder.features[0].in_channels == 2
    )
    assert {"backbone.mean", "backbone.std"} <= set(cmc.state_dict())


def test_cmc_memory_banks_z_once_and_proximal_update() -> None:
    cmc = make("cmc", channels=3, negatives=32, bank_momentum=0.5)
    cmc.train()
    index = torch.arange(N)
    context = step_context(0, 10, indices=index)
    x = views(0, channels=3)
    cmc(x, torch.zeros(N, dtype=torch.long), context)
    assert cmc.bank_l.shape == cmc.bank_ab.shape == (64, 128) and (cmc.z > 0).all()
    z_first = cmc.z.clone()
    bank_l, bank_ab = cmc.bank_l.clone(), cmc.bank_ab.clone()
    with torch.no_grad():
        h_l, h_ab = cmc.backbone.encode(x[0])
        z_l, z_ab = F.normalize(cmc.head_l(h_l), dim=1), F.normalize(cmc.head_ab(h_ab), dim=1)
    cmc.after_step(context)
    assert torch.allclose(cmc.bank_l[index], F.normalize(0.5 * bank_l[index] + 0.5 * z_l, dim=1), atol=1e-5)
    assert torch.allclose(
        cmc.bank_ab[index], F.normalize(0.5 * bank_ab[index] + 0.5 * z_ab, dim=1), atol=1e-5
    )
    assert torch.equal(cmc.bank_l[N:], bank_l[N:])
    losses = train(cmc, steps=3, channels=3)
    assert torch.equal(cmc.z, z_first) and all(math.isfinite(v) for v in losses)
    restored = make("cmc", channels=3, negatives=32)
    restored.load_state_dict(cmc.state_dict())
    assert torch.equal(restored.bank_l, cmc.bank_l) and torch.equal(restored.z, cmc.z)


def test_cmc_loss_is_the_nce_of_the_drawn_memory_entries() -> None:
    cmc = make("cmc", channels=3, negatives=32)
    cmc.train()
    index = torch.arange(5, 5 + N)
    x = views(0, channels=3)
    out = cmc(x, torch.zeros(N, dtype=torch.long), step_context(indices=index))
    with torch.no_grad():
        h_l, h_ab = cmc.backbone.encode(x[0])
        z_l, z_ab = F.normalize(cmc.head_l(h_l), dim=1), F.normalize(cmc.head_ab(h_ab), dim=1)
    noise = torch.randint(64, (N, 32), generator=torch.Generator().manual_seed(0))  # seed 0, step 0
    drawn = torch.cat([index[:, None], noise], dim=1)
    scores_l = torch.einsum("nd,nkd->nk", z_l, cmc.bank_ab[drawn])
    scores_ab = torch.einsum("nd,nkd->nk", z_ab, cmc.bank_l[drawn])
    assert float(cmc.z[0]) == pytest.approx(cmc_partition(scores_l, 64, 0.07), rel=1e-5)
    expected = cmc_nce(scores_l, scores_ab, 64, float(cmc.z[0]), float(cmc.z[1]), 0.07)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    in_batch = make("cmc", channels=3, negatives=0)
    in_batch.train()
    out = in_batch(x, torch.zeros(N, dtype=torch.long), step_context())
    with torch.no_grad():
        h_l, h_ab = in_batch.backbone.encode(x[0])
        expected = cmc_in_batch(in_batch.head_l(h_l), in_batch.head_ab(h_ab))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5) and in_batch.bank_l.numel() == 0


# ------------------------------------------------------------------------------ short real pretrainings

# Linear-probe margins over the random-init baseline, measured with these very runs (2 epochs, each method's
# defaults; seed 0, then seed 1): VICReg +2.5 / +3.45 points and NNCLR +4.2 / +3.45 on 2,000 embedded
# images, InvaSpread +3.85 / +5.25 on 3,000, CMC +3.0 / +5.0 on the 1,000 RGB images of `synthetic` (its
# random-init probe is already at 96.5%); on pipeline 2, NNCLR +1.45 / +3.95. Each test asks for about half of
# its seed-0 margin.
MARGINS = {"vicreg": 0.012, "nnclr": 0.007, "invaspread": 0.019, "cmc": 0.015}
RUNS: dict[str, dict[str, Any]] = {  # VICReg's 2048-wide expander and NNCLR's cost more per step
    "vicreg": {"train_subset": 2000},
    "nnclr": {"train_subset": 2000},
    "invaspread": {"train_subset": 3000},
    "cmc": {"dataset": "synthetic"},  # CMC needs colour
}


@pytest.mark.parametrize("method", list(MARGINS))
def test_short_pretraining_beats_random_init(method: str, tmp_path) -> None:
    config = from_mapping({"method": method, "epochs": 2, "seed": 0, **RUNS[method]})
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    outcome = run_trial(config, store, checkpoint_dir=tmp_path)
    margin = outcome.metrics["linear_top1"] - outcome.metrics["baseline_linear_top1"]
    assert margin > MARGINS[method], outcome.metrics
    assert outcome.status == "done" and outcome.collapsed is False
    losses = [m for m in store.metrics(outcome.trial_id) if m.name == "loss"]
    assert [m.epoch for m in losses] == [1, 2] and all(math.isfinite(m.value) for m in losses)
