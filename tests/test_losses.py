import math

import pytest
import torch

from sslab.losses import nt_xent


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, normalize: bool) -> float:
    """Eq. 1 of SimCLR written out with loops over anchors."""
    z = torch.cat([z1, z2]).double()
    if normalize:
        z = z / z.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = math.exp(float(z[i] @ z[positive]) / temperature)
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(numerator / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_reference(normalize: bool, temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    if not normalize:
        z1, z2 = z1 * 0.3, z2 * 0.3  # keep exp() of unnormalised logits in a sane range
    expected = naive_nt_xent(z1, z2, temperature, normalize)
    assert nt_xent(z1, z2, temperature, normalize).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_exact_value_for_orthogonal_identical_views() -> None:
    # N orthonormal embeddings as both views: each anchor's positive has similarity 1 and its 2N-2
    # negatives have similarity 0 (its own copy is the positive), so loss = -log(e^{1/T} / (e^{1/T} + 2N-2)).
    n, temperature = 4, 0.5
    z = torch.eye(n)
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 2 * n - 2))
    assert nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_symmetric_in_views() -> None:
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    assert nt_xent(z1, z2).item() == pytest.approx(nt_xent(z2, z1).item(), rel=1e-6)


def test_nt_xent_gradient_flows_to_both_views() -> None:
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(4, 3, requires_grad=True)
    nt_xent(z1, z2).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    assert z2.grad is not None and z2.grad.abs().sum() > 0


def test_nt_xent_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0)
