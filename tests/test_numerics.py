"""Losses (and the products between a method's embeddings and its loss) compute in float32 under autocast.

Under bf16 autocast a matrix product rounds its result to bf16's 8-bit mantissa (three significant digits);
divided by temperatures of 0.04-0.5 that moves the logits by ~0.1. Every loss of embeddings, on the same
float32 embeddings, must give the same value and gradient inside `torch.autocast("cpu", torch.bfloat16)`
as outside it.
"""

from collections.abc import Callable

import pytest
import torch

from sslab import losses
from sslab.methods.dino import DINO
from sslab.methods.swav import _scores

N, D, K, M = 16, 32, 24, 8  # batch, embedding width, prototypes / outputs, noise draws per row


def _embeddings(*shapes: tuple[int, ...], unit: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=g) for shape in shapes]
    if unit:  # cosines and unit features, as the InstDisc losses take them
        tensors = [t / t.norm(dim=-1, keepdim=True) for t in tensors]
    return [t.requires_grad_() for t in tensors]


def _cosines(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(*shape, generator=g) * 2 - 1).requires_grad_() for shape in shapes]


def _codes() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [losses.sinkhorn(torch.randn(N, K, generator=g)) for _ in range(2)]


# name -> (embeddings, loss of them); a loss may return a tensor or a float (no gradient).
CASES: dict[str, tuple[Callable[[], list[torch.Tensor]], Callable[..., object]]] = {
    "nt_xent": (lambda: _embeddings((N, D), (N, D)), lambda z1, z2: losses.nt_xent(z1, z2, 0.5)),
    "nt_xent-gathered": (
        lambda: _embeddings((N, D), (N, D)),
        lambda z1, z2: losses.nt_xent(z1[4:8], z2[4:8], 0.1, True, z1, z2, rank_offset=4),
    ),
    "info_nce-queue": (
        lambda: _embeddings((N, D), (N, D), (64, D)),
        lambda q, k, queue: losses.info_nce(q, k, queue, 0.2),
    ),
    "info_nce-batch": (lambda: _embeddings((N, D), (N, D)), lambda q, k: losses.info_nce(q, k, None, 0.2)),
    "byol_loss": (lambda: _embeddings((N, D), (N, D)), lambda p, z: losses.byol_loss(p, z, False)),
    "negative_cosine": (lambda: _embeddings((N, D), (N, D)), lambda p, z: losses.negative_cosine(p, z)),
    "barlow_twins": (lambda: _embeddings((N, D), (N, D)), lambda z1, z2: losses.barlow_twins(z1, z2, 0.0051)),
    "sinkhorn": (lambda: _embeddings((N, K)), lambda s: losses.sinkhorn(s, 0.05, 3)),
    "swav_loss": (
        lambda: _embeddings((N, K), (N, K), (N, K)),
        lambda *scores: losses.swav_loss(list(scores), _codes(), 0.1),
    ),
    "dino_loss": (
        lambda: _embeddings((N, K), (N, K), (N, K), (1, K)),
        lambda s1, s2, s3, c: losses.dino_loss([s1, s2, s3], [s1.detach(), s2.detach()], c, 0.1, 0.04),
    ),
    "dino_center": (
        lambda: _embeddings((N, K), (N, K), (1, K)),
        lambda t1, t2, c: losses.dino_center(c, [t1, t2], 0.9),
    ),
    "instdisc_partition": (
        lambda: _embeddings((N, D), (N, M, D), unit=True),
        lambda v, negatives: losses.instdisc_partition(v, negatives, 1000, 0.07),
    ),
    "instdisc_partition_from_cosines": (
        lambda: _cosines((N, M)),
        lambda cosines: losses.instdisc_partition_from_cosines(cosines, 1000, 0.07),
    ),
    "instdisc_nce": (
        lambda: _embeddings((N, D), (N, D), (N, M, D), unit=True),
        lambda v, positives, negatives: losses.instdisc_nce(v, positives, negatives, 1000, 900.0, 0.07),
    ),
    "instdisc_nce_from_cosines": (
        lambda: _cosines((N,), (N, M)),
        lambda pos, noise: losses.instdisc_nce_from_cosines(pos, noise, 1000, 900.0, 0.07),
    ),
    # Between the embeddings and the loss, in the methods: DINO's last layer, SwAV's prototype scores.
    "dino-last-layer": (lambda: _embeddings((N, D), (K, D)), lambda z, v: DINO._out(z, v)),
    "swav-scores": (lambda: _embeddings((N, D), (K, D), unit=True), lambda z, c: _scores(z, c)),
}


def _run(case: str, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    make, loss = CASES[case]
    inputs = make()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = loss(*inputs)
    value = out if isinstance(out, torch.Tensor) else torch.tensor(out, dtype=torch.float64)
    if value.requires_grad:  # a (non-scalar) output is reduced with fixed weights to get a gradient
        weights = torch.linspace(-1, 1, value.numel()).reshape(value.shape)
        (value * weights).sum().backward()
    return value.detach(), [t.grad for t in inputs]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=what)


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_computes_the_loss_and_gradient_in_float32(case: str) -> None:
    expected, expected_grads = _run(case, autocast=False)
    value, grads = _run(case, autocast=True)
    assert value.dtype == expected.dtype  # float32 (or the float64 of a Python float), not bf16
    _close(value, expected, f"{case} value")
    assert [g is None for g in grads] == [g is None for g in expected_grads]
    for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads, strict=True)):
        if expected_grad is not None:
            assert grad is not None and grad.dtype == torch.float32
            _close(grad, expected_grad, f"{case} gradient of input {i}")
    if value.requires_grad or any(g is not None for g in expected_grads):
        assert any(g is not None and g.abs().sum() > 0 for g in expected_grads)


def test_without_full_precision_bf16_autocast_would_round_the_similarities() -> None:
    """The comparison above is not vacuous: the undecorated NT-Xent differs under the same autocast."""
    plain = losses.nt_xent.__wrapped__  # type: ignore[attr-defined]

    def gradient(loss: Callable[..., torch.Tensor], autocast: bool) -> torch.Tensor:
        z1, z2 = _embeddings((N, D), (N, D))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss(z1, z2, 0.1)
        value.backward()  # outside autocast, as the trainer does
        assert z1.grad is not None
        return z1.grad

    exact = gradient(plain, autocast=False)
    error = (gradient(plain, autocast=True) - exact).abs().max() / exact.abs().max()
    assert error > 1e-3  # bf16 similarities: a hundred times the tolerance above
    _close(gradient(losses.nt_xent, autocast=True), exact, "decorated")


def test_bf16_embeddings_are_upcast_once_and_keep_their_gradient() -> None:
    z1, z2 = (t.detach().bfloat16().requires_grad_() for t in _embeddings((N, D), (N, D)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.nt_xent(z1, z2, 0.5, True, z1, z2)  # gathered == local: the plain loss's path
    expected = losses.nt_xent(z1.detach().float(), z2.detach().float(), 0.5)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert z1.grad is not None and z1.grad.dtype == torch.bfloat16 and z1.grad.abs().sum() > 0
