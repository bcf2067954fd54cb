import math

import pytest
import torch
import torch.nn.functional as F

from sslab.losses import (
    barlow_twins,
    byol_loss,
    dino_center,
    dino_loss,
    info_nce,
    instdisc_nce,
    instdisc_nce_from_cosines,
    instdisc_partition,
    instdisc_partition_from_cosines,
    negative_cosine,
    sinkhorn,
    swav_loss,
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


# ---------------------------------------------------------------------------------------------- info_nce


def naive_info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, temperature: float, rank_offset: int
) -> float:
    """MoCo eq. 1 with loops over queries: -log exp(q.k+ / T) / sum over the positive and the negatives."""
    total = 0.0
    for n in range(q.shape[0]):
        qn = unit(q[n])
        if queue is not None:
            positive = math.exp(float(qn @ unit(k[n])) / temperature)
            negatives = sum(math.exp(float(qn @ unit(queue[j])) / temperature) for j in range(queue.shape[0]))
            denominator = positive + negatives
        else:
            positive = math.exp(float(qn @ unit(k[rank_offset + n])) / temperature)
            denominator = sum(math.exp(float(qn @ unit(k[j])) / temperature) for j in range(k.shape[0]))
        total += -math.log(positive / denominator)
    return total / q.shape[0]


@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_with_queue_matches_naive_reference(temperature: float) -> None:
    q, k, queue = randn(5, 4, seed=1), randn(5, 4, seed=2), randn(7, 4, seed=3) * 3
    expected = naive_info_nce(q, k, queue, temperature, 0)
    assert info_nce(q, k, queue, temperature).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
@pytest.mark.parametrize(("n_keys", "rank_offset"), [(5, 0), (15, 0), (15, 5), (15, 10)])
def test_info_nce_in_batch_matches_naive_reference(temperature: float, n_keys: int, rank_offset: int) -> None:
    q, k = randn(5, 4, seed=1), randn(n_keys, 4, seed=2)
    expected = naive_info_nce(q, k, None, temperature, rank_offset)
    assert info_nce(q, k, None, temperature, rank_offset=rank_offset).item() == pytest.approx(
        expected, rel=1e-10
    )


def test_info_nce_exact_value_for_orthonormal_keys() -> None:
    # q_n = k_n = e_n, queue = K other basis vectors: positive logit 1/T, K negative logits 0.
    n, n_queue, temperature = 3, 5, 0.2
    basis = torch.eye(n + n_queue, dtype=torch.float64)
    q = basis[:n] * 2.5  # scale is removed by the normalisation
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + n_queue))
    assert info_nce(q, basis[:n], basis[n:], temperature).item() == pytest.approx(expected, rel=1e-12)
    # queue=None: M orthonormal keys, q = k[r:r+N]; each query has M - 1 negatives at logit 0.
    # The result carries no 2T factor (MoCo v3 applies it in the method).
    m, r = 8, 3
    keys = torch.eye(m, dtype=torch.float64)
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + m - 1))
    assert info_nce(keys[r : r + n], keys, None, temperature, rank_offset=r).item() == pytest.approx(
        expected, rel=1e-12
    )


def test_info_nce_gradient_reaches_q_only() -> None:
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    queue = torch.randn(6, 3, requires_grad=True)
    info_nce(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None
    k_all = torch.randn(8, 3, requires_grad=True)
    info_nce(q, k_all, rank_offset=4).backward()
    assert k_all.grad is None


def test_info_nce_rejects_bad_input() -> None:
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="q \\(N, D\\)"):
        info_nce(q, torch.randn(4, 5))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, temperature=0)
    with pytest.raises(ValueError, match="one key per query"):
        info_nce(q, torch.randn(6, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="queue must be"):
        info_nce(q, q, torch.randn(5, 4))
    with pytest.raises(ValueError, match="rank_offset applies only"):
        info_nce(q, q, torch.randn(5, 3), rank_offset=1)
    with pytest.raises(ValueError, match="rank_offset must lie"):
        info_nce(q, torch.randn(6, 3), rank_offset=3)
    with pytest.raises(ValueError, match="rank_offset must lie"):
        info_nce(q, torch.randn(3, 3))


# ---------------------------------------------------------------------------------- byol / negative_cosine


def naive_cosines(p: torch.Tensor, z: torch.Tensor) -> list[float]:
    return [float(p[n] @ z[n]) / (float(p[n].norm()) * float(z[n].norm())) for n in range(p.shape[0])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byol_and_negative_cosine_match_naive_reference(seed: int) -> None:
    p, z = randn(6, 5, seed=seed), randn(6, 5, seed=seed + 10) * 4
    cosines = naive_cosines(p, z)
    assert byol_loss(p, z).item() == pytest.approx(sum(2 - 2 * c for c in cosines) / 6, rel=1e-12)
    assert negative_cosine(p, z).item() == pytest.approx(-sum(cosines) / 6, rel=1e-12)
    # the switch changes the gradient only, never the value
    assert byol_loss(p, z, stop_gradient=False).item() == pytest.approx(byol_loss(p, z).item(), rel=1e-12)


def test_byol_and_negative_cosine_exact_values() -> None:
    p = randn(4, 6)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-12)
    assert negative_cosine(p, 3 * p).item() == pytest.approx(-1.0, rel=1e-12)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, rel=1e-12)
    e = torch.eye(4, dtype=torch.float64)
    assert byol_loss(e, e.roll(1, dims=1)).item() == pytest.approx(2.0, rel=1e-12)  # orthogonal: cos = 0
    assert negative_cosine(e, e.roll(1, dims=1)).item() == pytest.approx(0.0, abs=1e-12)


def test_byol_symmetrised_loss_is_symmetric_in_views() -> None:
    p1, p2, z1, z2 = randn(5, 4, seed=0), randn(5, 4, seed=1), randn(5, 4, seed=2), randn(5, 4, seed=3)

    def symmetrised(pa: torch.Tensor, za: torch.Tensor, pb: torch.Tensor, zb: torch.Tensor) -> float:
        return (byol_loss(pa, zb) + byol_loss(pb, za)).item()

    assert symmetrised(p1, z1, p2, z2) == pytest.approx(symmetrised(p2, z2, p1, z1), rel=1e-12)


@pytest.mark.parametrize("loss", [byol_loss, negative_cosine])
def test_stop_gradient_switch(loss) -> None:
    p = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 3, requires_grad=True)
    loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None
    loss(p, z, stop_gradient=False).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", [byol_loss, negative_cosine])
def test_cosine_losses_reject_bad_input(loss) -> None:
    with pytest.raises(ValueError, match="equal shape"):
        loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="equal shape"):
        loss(torch.randn(4), torch.randn(4))


# ------------------------------------------------------------------------------------------- barlow_twins


def naive_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float) -> float:
    """Eqs. 1-2 with loops over dimensions and samples, population (1/N) variance."""
    n, d = z1.shape

    def standardise(z: torch.Tensor) -> list[list[float]]:
        columns = []
        for i in range(d):
            values = [float(z[b, i]) for b in range(n)]
            mean = sum(values) / n
            var = sum((x - mean) ** 2 for x in values) / n
            columns.append([(x - mean) / math.sqrt(var + eps) for x in values])
        return columns

    a, b = standardise(z1), standardise(z2)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][s] * b[j][s] for s in range(n)) / n
            total += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return total


@pytest.mark.parametrize("lambd", [0.0, 5e-3, 0.5])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_barlow_twins_matches_naive_reference(lambd: float, eps: float) -> None:
    z1, z2 = randn(8, 5, seed=0) * 2 + 1, randn(8, 5, seed=1)
    z2 = z2 + 0.5 * z1  # some correlation
    expected = naive_barlow_twins(z1, z2, lambd, eps)
    assert barlow_twins(z1, z2, lambd, eps=eps).item() == pytest.approx(expected, rel=1e-10)


def test_barlow_twins_exact_values() -> None:
    # Every dimension a copy of one standardised signal: C is all ones, loss = lambd * D (D - 1).
    n, d, lambd = 6, 4, 0.1
    x = randn(n, 1) * 3 + 2
    z = x.expand(n, d)
    assert barlow_twins(z, 5 * z + 1, lambd, eps=0.0).item() == pytest.approx(lambd * d * (d - 1), rel=1e-12)
    # Uncorrelated standardised dimensions (Hadamard columns): C = I gives 0; views z and -z give C = -I, 4 D.
    h = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    assert barlow_twins(h, h, lambd, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert barlow_twins(h, -h, lambd, eps=0.0).item() == pytest.approx(4.0 * 3, rel=1e-12)
    # the default eps shrinks C_ii = 1 / (1 + eps) for these unit-variance columns
    assert barlow_twins(h, h, lambd).item() == pytest.approx(3 * (1 - 1 / (1 + 1e-5)) ** 2, rel=1e-6)


def test_barlow_twins_is_symmetric_in_views() -> None:
    # C(z2, z1) = C(z1, z2).T and both terms of eq. 1 are invariant under transposition.
    z1, z2 = randn(8, 5, seed=0), randn(8, 5, seed=1)
    assert barlow_twins(z1, z2).item() == pytest.approx(barlow_twins(z2, z1).item(), rel=1e-12)


def test_barlow_twins_gradient_flows_to_both_views() -> None:
    z1 = torch.randn(6, 3, requires_grad=True)
    z2 = torch.randn(6, 3, requires_grad=True)
    barlow_twins(z1, z2).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    assert z2.grad is not None and z2.grad.abs().sum() > 0


def test_barlow_twins_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        barlow_twins(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="lambd"):
        barlow_twins(torch.randn(4, 3), torch.randn(4, 3), lambd=-1.0)
    with pytest.raises(ValueError, match="eps"):
        barlow_twins(torch.randn(4, 3), torch.randn(4, 3), eps=-1.0)


# ----------------------------------------------------------------------------------------------- sinkhorn


def naive_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> list[list[float]]:
    """Sinkhorn-Knopp with loops: Q (K x B) = exp(scores / eps).T, total 1, rows to 1/K, columns to 1/B."""
    b, k = scores.shape
    q = [[math.exp(float(scores[s, p]) / epsilon) for s in range(b)] for p in range(k)]
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for p in range(k):
            row_sum = sum(q[p])
            q[p] = [x / row_sum / k for x in q[p]]
        for s in range(b):
            col_sum = sum(q[p][s] for p in range(k))
            for p in range(k):
                q[p][s] = q[p][s] / col_sum / b
    return [[q[p][s] * b for p in range(k)] for s in range(b)]  # (B, K)


@pytest.mark.parametrize(("epsilon", "iterations"), [(0.05, 3), (0.1, 1), (0.5, 10)])
def test_sinkhorn_matches_naive_reference(epsilon: float, iterations: int) -> None:
    scores = torch.tanh(randn(7, 4))  # cosine-like scores in (-1, 1)
    expected = torch.tensor(naive_sinkhorn(scores, epsilon, iterations), dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(scores, epsilon, iterations), expected, rtol=1e-10, atol=1e-12)


def test_sinkhorn_of_constant_scores_is_uniform() -> None:
    codes = sinkhorn(torch.full((6, 4), 0.7, dtype=torch.float64))
    torch.testing.assert_close(codes, torch.full((6, 4), 0.25, dtype=torch.float64))


def test_sinkhorn_marginals() -> None:
    b, k = 32, 8
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    scores = z @ prototypes.T  # (B, K) cosine scores

    def column_error(codes: torch.Tensor) -> float:
        return float((codes.sum(dim=0) - b / k).abs().max() / (b / k))

    # every iteration ends with the sample normalisation, so rows sum to 1 exactly; prototype columns
    # approach B/K as the iterations go (3 iterations, the default, is only roughly balanced here)
    errors = []
    for iterations in (1, 3, 10):
        codes = sinkhorn(scores, iterations=iterations)
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(b))
        errors.append(column_error(codes))
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.5
    balanced = sinkhorn(scores.double(), iterations=500)
    torch.testing.assert_close(balanced.sum(dim=1), torch.ones(b, dtype=torch.float64))
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((k,), b / k, dtype=torch.float64))


def test_sinkhorn_is_stable_and_gradient_free() -> None:
    # exp(scores / 0.05) overflows float64, and exp of (scores - max) / 0.05 underflows whole rows, here
    scores = (torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 1000).requires_grad_()
    codes = sinkhorn(scores)
    assert torch.isfinite(codes).all() and not codes.requires_grad
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(5))
    shifted = sinkhorn(scores.detach() + 123.0)  # invariant to a constant shift of all scores
    torch.testing.assert_close(codes, shifted)


def test_sinkhorn_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="\\(B, K\\)"):
        sinkhorn(torch.randn(4))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.randn(4, 3), epsilon=0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(torch.randn(4, 3), iterations=0)


# ---------------------------------------------------------------------------------------------- swav_loss


def naive_log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_z for x in row]


def naive_swav(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> float:
    b, k = scores[0].shape
    pair_losses = []
    for j in range(len(codes)):
        for i in range(len(scores)):
            if i == j:
                continue
            total = 0.0
            for s in range(b):
                log_p = naive_log_softmax([float(scores[i][s, p]) / temperature for p in range(k)])
                total += -sum(float(codes[j][s, p]) * log_p[p] for p in range(k))
            pair_losses.append(total / b)
    return sum(pair_losses) / len(pair_losses)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize(("n_crops", "n_codes"), [(2, 2), (4, 2), (3, 1)])
def test_swav_loss_matches_naive_reference(temperature: float, n_crops: int, n_codes: int) -> None:
    scores = [torch.tanh(randn(5, 4, seed=i)) for i in range(n_crops)]
    codes = [sinkhorn(scores[j]) for j in range(n_codes)]
    expected = naive_swav(scores, codes, temperature)
    assert swav_loss(scores, codes, temperature).item() == pytest.approx(expected, rel=1e-10)


def test_swav_loss_with_uniform_scores_is_log_k() -> None:
    # log_softmax of constant scores is -log K; every code row sums to 1.
    k = 6
    scores = [torch.zeros(4, k, dtype=torch.float64) for _ in range(3)]
    codes = [torch.softmax(randn(4, k, seed=j), dim=1) for j in range(2)]
    assert swav_loss(scores, codes).item() == pytest.approx(math.log(k), rel=1e-12)


def test_swav_loss_gradient_reaches_scores_not_codes() -> None:
    scores = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    codes = [torch.softmax(torch.randn(4, 3), dim=1).requires_grad_() for _ in range(2)]
    swav_loss(scores, codes).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    assert all(c.grad is None for c in codes)


def test_swav_loss_rejects_bad_input() -> None:
    s = torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least 2 crops"):
        swav_loss([s], [s])
    with pytest.raises(ValueError, match="len\\(codes\\)"):
        swav_loss([s, s], [])
    with pytest.raises(ValueError, match="len\\(codes\\)"):
        swav_loss([s, s], [s, s, s])
    with pytest.raises(ValueError, match="one shape"):
        swav_loss([s, torch.randn(4, 5)], [s])
    with pytest.raises(ValueError, match="temperature"):
        swav_loss([s, s], [s], temperature=0)


# ---------------------------------------------------------------------------------- dino_loss / dino_center


def naive_dino(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, ts: float, tt: float
) -> float:
    b, k = student[0].shape
    c = center.reshape(-1)
    pair_losses = []
    for j in range(len(teacher)):
        for i in range(len(student)):
            if i == j:
                continue
            total = 0.0
            for s in range(b):
                log_p_t = naive_log_softmax([(float(teacher[j][s, p]) - float(c[p])) / tt for p in range(k)])
                log_p_s = naive_log_softmax([float(student[i][s, p]) / ts for p in range(k)])
                total += -sum(math.exp(log_p_t[p]) * log_p_s[p] for p in range(k))
            pair_losses.append(total / b)
    return sum(pair_losses) / len(pair_losses)


@pytest.mark.parametrize(("student_temp", "teacher_temp"), [(0.1, 0.04), (0.1, 0.07), (0.5, 0.2)])
@pytest.mark.parametrize(("n_crops", "n_global"), [(2, 2), (5, 2), (3, 1)])
def test_dino_loss_matches_naive_reference(
    student_temp: float, teacher_temp: float, n_crops: int, n_global: int
) -> None:
    student = [randn(4, 6, seed=i) for i in range(n_crops)]
    teacher = [randn(4, 6, seed=10 + j) for j in range(n_global)]
    center = randn(1, 6, seed=20) * 0.3
    expected = naive_dino(student, teacher, center, student_temp, teacher_temp)
    got = dino_loss(student, teacher, center, student_temp, teacher_temp).item()
    assert got == pytest.approx(expected, rel=1e-10)
    flat_center = dino_loss(student, teacher, center.reshape(-1), student_temp, teacher_temp).item()
    assert flat_center == pytest.approx(expected, rel=1e-10)


def test_dino_loss_with_uniform_student_is_log_k() -> None:
    k = 5
    student = [torch.full((3, k), 2.0, dtype=torch.float64) for _ in range(4)]
    teacher = [randn(3, k, seed=j) for j in range(2)]
    assert dino_loss(student, teacher, torch.zeros(k)).item() == pytest.approx(math.log(k), rel=1e-12)
    # a teacher equal to the centre is uniform too: cross-entropy of uniform vs softmax(s / T_s)
    s = randn(3, k, seed=7)
    log_p_s = torch.log_softmax(s / 0.1, dim=1)
    expected = float(-(log_p_s.mean(dim=1)).mean())
    center = randn(k, seed=8)
    got = dino_loss([center.expand(3, k), s], [center.expand(3, k)], center).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_dino_loss_gradient_reaches_student_only() -> None:
    student = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    center = torch.randn(1, 3, requires_grad=True)
    dino_loss(student, teacher, center).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher) and center.grad is None


def test_dino_center_update() -> None:
    center = randn(1, 4, seed=0)
    teacher = [randn(3, 4, seed=1), randn(3, 4, seed=2)]
    batch_mean = [sum(float(t[s, p]) for t in teacher for s in range(3)) / 6 for p in range(4)]
    expected = torch.tensor(
        [[0.9 * float(center[0, p]) + 0.1 * batch_mean[p] for p in range(4)]], dtype=torch.float64
    )
    torch.testing.assert_close(dino_center(center, teacher), expected)
    torch.testing.assert_close(dino_center(center, teacher, momentum=1.0), center)
    torch.testing.assert_close(
        dino_center(center.reshape(-1), teacher, momentum=0.0), expected.new_tensor(batch_mean)
    )
    moving = [t.clone().requires_grad_() for t in teacher]
    assert not dino_center(center, moving).requires_grad


def test_dino_rejects_bad_input() -> None:
    s, c = torch.randn(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="len\\(teacher_out\\)"):
        dino_loss([s], [s], c)
    with pytest.raises(ValueError, match="len\\(teacher_out\\)"):
        dino_loss([s, s], [], c)
    with pytest.raises(ValueError, match="len\\(teacher_out\\)"):
        dino_loss([s, s], [s, s, s], c)
    with pytest.raises(ValueError, match="one shape"):
        dino_loss([s, torch.randn(5, 3)], [s], c)
    with pytest.raises(ValueError, match="center"):
        dino_loss([s, s], [s], torch.zeros(4))
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss([s, s], [s], c, student_temp=0)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss([s, s], [s], c, teacher_temp=-1)
    with pytest.raises(ValueError, match="momentum"):
        dino_center(c, [s], momentum=1.5)
    with pytest.raises(ValueError, match="at least one"):
        dino_center(c, [])
    with pytest.raises(ValueError, match="dino_center expects"):
        dino_center(torch.zeros(4), [s])


# ------------------------------------------------------------------------------------------ instdisc_nce


def naive_instdisc_nce(
    v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, n_data: int, z: float, temperature: float
) -> float:
    """J_NCE with loops: h = P / (P + m P_n), P(i|v) = exp(v_i . v / T) / Z, P_n = 1 / n."""
    n, m, _ = neg.shape
    total = 0.0
    for b in range(n):
        vb = unit(v[b])
        p = math.exp(float(vb @ unit(pos[b])) / temperature) / z
        total += -math.log(p / (p + m / n_data))
        for j in range(m):
            p_noise = math.exp(float(vb @ unit(neg[b, j])) / temperature) / z
            total += -math.log(1 - p_noise / (p_noise + m / n_data))
    return total / n


def naive_partition(v: torch.Tensor, neg: torch.Tensor, n_data: int, temperature: float) -> float:
    n, m, _ = neg.shape
    values = [math.exp(float(unit(v[b]) @ unit(neg[b, j])) / temperature) for b in range(n) for j in range(m)]
    return n_data * sum(values) / len(values)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize(("m", "n_data"), [(1, 10), (4, 100), (16, 50000)])
def test_instdisc_matches_naive_reference(temperature: float, m: int, n_data: int) -> None:
    v, pos, neg = randn(5, 3, seed=0), randn(5, 3, seed=1), randn(5, m, 3, seed=2)
    z_hat = instdisc_partition(v, neg, n_data, temperature)
    assert z_hat == pytest.approx(naive_partition(v, neg, n_data, temperature), rel=1e-10)
    expected = naive_instdisc_nce(v, pos, neg, n_data, z_hat, temperature)
    assert instdisc_nce(v, pos, neg, n_data, z_hat, temperature).item() == pytest.approx(expected, rel=1e-9)


def test_instdisc_exact_values() -> None:
    # v = positive = e_0, noise orthogonal to v: logits 1/T and 0. With Z = (n/m) e^{1/T}, P(i|v) = m/n so
    # h = 1/2; each noise has P = (m/n) e^{-1/T}, 1 - h = 1 / (1 + e^{-1/T}).
    n_data, m, temperature = 1000, 3, 0.5
    e = torch.eye(4, dtype=torch.float64)
    v, neg = e[:1], e[1:].unsqueeze(0)  # (1, 4), (1, 3, 4)
    z = n_data / m * math.exp(1 / temperature)
    expected = math.log(2) + m * math.log(1 + math.exp(-1 / temperature))
    assert instdisc_nce(v, v.clone(), neg, n_data, z, temperature).item() == pytest.approx(
        expected, rel=1e-12
    )
    assert instdisc_partition(v, neg, n_data, temperature) == pytest.approx(n_data, rel=1e-12)  # exp(0) = 1
    same = v.unsqueeze(1).expand(1, m, 4)
    assert instdisc_partition(v, same, n_data, temperature) == pytest.approx(n_data * math.exp(2), rel=1e-12)


def test_instdisc_gradient_reaches_features_not_memory_bank() -> None:
    v = torch.randn(4, 3, requires_grad=True)
    pos = torch.randn(4, 3, requires_grad=True)
    neg = torch.randn(4, 5, 3, requires_grad=True)
    instdisc_nce(v, pos, neg, n_data=100, z=50.0).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None


def test_instdisc_rejects_bad_input() -> None:
    v, neg = torch.randn(4, 3), torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match="negatives \\(N, m, D\\)"):
        instdisc_nce(v, v, torch.randn(4, 5, 2), 100, 1.0)
    with pytest.raises(ValueError, match="negatives \\(N, m, D\\)"):
        instdisc_partition(v, torch.randn(3, 5, 3), 100)
    with pytest.raises(ValueError, match="m >= 1"):
        instdisc_nce(v, v, torch.randn(4, 0, 3), 100, 1.0)
    with pytest.raises(ValueError, match="n_data"):
        instdisc_nce(v, v, neg, 0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        instdisc_partition(v, neg, 100, temperature=0)
    with pytest.raises(ValueError, match="positives"):
        instdisc_nce(v, torch.randn(4, 2), neg, 100, 1.0)
    with pytest.raises(ValueError, match="z must be"):
        instdisc_nce(v, v, neg, 100, 0.0)
    with pytest.raises(ValueError, match="positive cosines \\(N,\\) and noise cosines \\(N, m\\)"):
        instdisc_nce_from_cosines(torch.zeros(3), torch.zeros(4, 5), 100, 1.0)
    with pytest.raises(ValueError, match="noise cosines \\(N, m\\)"):
        instdisc_partition_from_cosines(torch.zeros(4), 100)


def test_instdisc_from_cosines_is_the_loss_of_those_cosines() -> None:
    v, pos, neg = randn(5, 3, seed=0), randn(5, 3, seed=1), randn(5, 4, 3, seed=2)
    unit_v, unit_pos, unit_neg = (F.normalize(t, dim=-1) for t in (v, pos, neg))
    pos_cos = (unit_v * unit_pos).sum(1)  # (N,)
    neg_cos = torch.einsum("nd,nmd->nm", unit_v, unit_neg)  # (N, m)
    z = instdisc_partition_from_cosines(neg_cos, 100, 0.07)
    assert z == pytest.approx(naive_partition(v, neg, 100, 0.07), rel=1e-10)
    expected = naive_instdisc_nce(v, pos, neg, 100, z, 0.07)
    loss = instdisc_nce_from_cosines(pos_cos, neg_cos, 100, z, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
