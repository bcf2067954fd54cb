"""Self-supervised losses as pure functions of tensors and hyperparameters.

State such as queues, centres and momentum encoders belongs to the methods; nothing here keeps any.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float = 0.5,
    normalize: bool = True,
    z1_all: Tensor | None = None,
    z2_all: Tensor | None = None,
    rank_offset: int = 0,
) -> Tensor:
    """NT-Xent of SimCLR (Chen et al. 2020, eq. 1), averaged over all 2N anchors.

    z1, z2: (N, D) embeddings of the two views; row i of z1 and row i of z2 are the positive pair,
    the other 2N - 2 embeddings are the negatives.
    Across processes, z1_all and z2_all (M, D) hold the views of the whole global batch (gathered by the
    trainer, with gradients) and z1 = z1_all[rank_offset : rank_offset + N]: the 2N local rows are the
    anchors and all 2M rows their candidates, so the mean of the processes' losses is the global batch's.
    Gathered tensors that are z1 and z2 themselves (a single process) give the plain loss.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = torch.cat([z1, z2]).float()  # (2N, D)
    if normalize:
        z = F.normalize(z, dim=1)
    if (z1_all is None and z2_all is None) or (z1_all is z1 and z2_all is z2):
        if rank_offset != 0:
            raise ValueError(f"rank_offset applies only to gathered z1_all, z2_all, got {rank_offset}")
        logits = z @ z.T / temperature  # (2N, 2N)
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
        return F.cross_entropy(logits, targets)
    if z1_all is None or z2_all is None or z1_all.shape != z2_all.shape or z1_all.dim() != 2:
        raise ValueError("nt_xent expects z1_all and z2_all together, as two (M, D) tensors of equal shape")
    m = z1_all.shape[0]
    if z1_all.shape[1] != z1.shape[1] or not 0 <= rank_offset <= m - n:
        raise ValueError(
            f"nt_xent expects z1_all (M, {z1.shape[1]}) with M >= N and rank_offset in [0, M - N]; got "
            f"z1 {tuple(z1.shape)}, z1_all {tuple(z1_all.shape)}, rank_offset {rank_offset}"
        )
    keys = torch.cat([z1_all, z2_all]).float()  # (2M, D)
    if normalize:
        keys = F.normalize(keys, dim=1)
    logits = z @ keys.T / temperature  # (2N, 2M)
    rows = torch.arange(rank_offset, rank_offset + n, device=z.device)  # (N,) rows of z1 within z1_all
    own = torch.cat([rows, m + rows])  # (2N,) each anchor's own column
    self_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, own[:, None], True)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([m + rows, rows])  # (2N,) the other view of the same image
    return F.cross_entropy(logits, targets)


def _as_float(x: Tensor) -> Tensor:
    """Upcast half-precision inputs to float32; float32 and float64 pass through unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_temperature(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"{name} expects two (N, D) tensors of equal shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def info_nce(
    q: Tensor,
    k: Tensor,
    queue: Tensor | None = None,
    temperature: float = 0.2,
    rank_offset: int = 0,
) -> Tensor:
    """InfoNCE of MoCo (He et al. 2019, eq. 1; v2: Chen et al. 2020), mean over the N queries.

    q: (N, D) queries, k: keys; both are l2-normalised here and k is a constant (stop-gradient).
    With a queue (K, D) of negatives (also a constant), k is (N, D) and the logits are
    [q_n . k_n, q_n . queue_1, ..., q_n . queue_K] / T, positive at index 0.
    With queue=None (MoCo v3, Chen, Xie & He 2021) the other keys are the negatives: logits q @ k.T / T
    and the positive of q_n is k[rank_offset + n]; k may hold M >= N rows (keys of the whole global
    batch, gathered by the trainer) with rank_offset the row of q's first positive. MoCo v3 scales this
    loss by 2T; that factor is the method's to apply, it is not included here.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"info_nce expects q (N, D) and k (M, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    _check_temperature("temperature", temperature)
    n = q.shape[0]
    q = F.normalize(_as_float(q), dim=1)  # (N, D)
    k = F.normalize(_as_float(k.detach()).to(q.dtype), dim=1)  # (M, D)
    if queue is not None:
        if k.shape[0] != n:
            raise ValueError(f"with a queue, k must have one key per query: q {n} rows, k {k.shape[0]} rows")
        if rank_offset != 0:
            raise ValueError(f"rank_offset applies only to queue=None, got {rank_offset}")
        if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
        negatives = F.normalize(queue.detach().to(q.dtype), dim=1)  # (K, D)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ negatives.T  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
        targets = torch.zeros(n, dtype=torch.long, device=q.device)  # (N,)
    else:
        if not 0 <= rank_offset <= k.shape[0] - n:
            raise ValueError(
                f"rank_offset must lie in [0, M - N] = [0, {k.shape[0] - n}] for q {n} rows and k "
                f"{k.shape[0]} rows, got {rank_offset}"
            )
        logits = q @ k.T / temperature  # (N, M)
        targets = torch.arange(rank_offset, rank_offset + n, device=q.device)  # (N,)
    return F.cross_entropy(logits, targets)


def byol_loss(p: Tensor, z: Tensor, stop_gradient: bool = True) -> Tensor:
    """BYOL regression loss 2 - 2 cos(p, sg(z)) (Grill et al. 2020, eq. 2), mean over the batch.

    p: (N, D) online predictions, z: (N, D) target projections. The method symmetrises by adding the
    loss with the views swapped. stop_gradient=False lets the gradient reach z (ablations).
    """
    _check_pair("byol_loss", p, z)
    if stop_gradient:
        z = z.detach()
    cos = F.cosine_similarity(_as_float(p), _as_float(z), dim=1)  # (N,)
    return (2 - 2 * cos).mean()


def negative_cosine(p: Tensor, z: Tensor, stop_gradient: bool = True) -> Tensor:
    """SimSiam D(p, sg(z)) = -cos(p, z) (Chen & He 2021, eqs. 1 and 3), mean over the batch.

    p: (N, D) predictions, z: (N, D) projections of the other view. The method symmetrises as
    1/2 D(p1, z2) + 1/2 D(p2, z1). stop_gradient=False is the paper's no-stop-gradient ablation.
    """
    _check_pair("negative_cosine", p, z)
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(_as_float(p), _as_float(z), dim=1).mean()


def barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> Tensor:
    """Barlow Twins redundancy reduction (Zbontar et al. 2021, eqs. 1-2).

    z1, z2: (N, D) embeddings of the two views. Each dimension is standardised over the batch with the
    biased (1/N) variance, (z - mean) / sqrt(var + eps), as the reference BatchNorm1d(affine=False) does,
    so C = z1n.T @ z2n / N is the cross-correlation matrix (D, D) and the loss is
    sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2. Symmetric in (z1, z2) since C(z2, z1) = C(z1, z2).T.
    """
    _check_pair("barlow_twins", z1, z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"barlow_twins needs a batch of at least 2 to standardise, got N={n}")
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0, got {lambd}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    def standardise(z: Tensor) -> Tensor:
        z = _as_float(z)
        centred = z - z.mean(dim=0)  # (N, D)
        return centred / torch.sqrt(centred.pow(2).mean(dim=0) + eps)  # (N, D)

    z1n, z2n = standardise(z1), standardise(z2)  # (N, D) each
    dtype = torch.promote_types(z1n.dtype, z2n.dtype)
    c = z1n.to(dtype).T @ z2n.to(dtype) / n  # (D, D)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp codes of SwAV (Caron et al. 2020, Sec. 3.1 and the appendix pseudo-code).

    scores: (B, K) = z @ prototypes.T for all B samples that share the equipartition constraint (gathered
    by the trainer). Q = exp(scores / epsilon).T (K, B) is normalised to sum 1, then rows (prototypes) are
    scaled to sum 1/K and columns (samples) to sum 1/B, `iterations` times; returns the codes Q.T * B
    (B, K), whose rows sum to 1 and columns to about B/K. No gradient; the scalings run on log Q in float64
    (logsumexp, so exp never overflows or underflows a whole row), the result has the input's dtype
    (at least float32).
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape (B, K), got {tuple(scores.shape)}")
    _check_temperature("epsilon", epsilon)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    b, k = scores.shape
    log_q = scores.detach().double().T / epsilon  # (K, B), log of Q = exp(scores / epsilon).T
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)  # Q sums to 1
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(k)  # prototype rows sum to 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)  # sample columns sum to 1/B
    q = torch.exp(log_q)  # (K, B)
    return (q * b).T.to(_as_float(scores).dtype)  # (B, K)


def swav_loss(scores: list[Tensor], codes: list[Tensor], temperature: float = 0.1) -> Tensor:
    """SwAV swapped prediction (Caron et al. 2020, eqs. 1-2, with multi-crop).

    scores[i]: (B, K) prototype scores of crop i, for all crops (global first, then local).
    codes[j]: (B, K) Sinkhorn codes of crop j, for the first len(codes) crops (the global ones); constants.
    Loss = mean over pairs (j, i != j) of the batch mean of -sum_k codes[j] * log_softmax(scores[i] / T);
    every j has len(scores) - 1 partners, so this equals the reference average over i then over j.
    """
    if len(scores) < 2:
        raise ValueError(f"swav_loss needs at least 2 crops, got {len(scores)}")
    if not 1 <= len(codes) <= len(scores):
        raise ValueError(
            f"swav_loss needs 1 <= len(codes) <= len(scores), got {len(codes)} and {len(scores)}"
        )
    shape = scores[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in [*scores, *codes]):
        raise ValueError(
            f"swav_loss expects scores and codes all (B, K) of one shape, got "
            f"{[tuple(t.shape) for t in scores]} and {[tuple(t.shape) for t in codes]}"
        )
    _check_temperature("temperature", temperature)
    log_p = [F.log_softmax(_as_float(s) / temperature, dim=1) for s in scores]  # each (B, K)
    total = scores[0].new_zeros((), dtype=log_p[0].dtype)
    n_pairs = 0
    for j, code in enumerate(codes):
        q = _as_float(code.detach())  # (B, K)
        for i, log_p_i in enumerate(log_p):
            if i == j:
                continue
            total = total - (q * log_p_i).sum(dim=1).mean()
            n_pairs += 1
    return total / n_pairs


def dino_loss(
    student_out: list[Tensor],
    teacher_out: list[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> Tensor:
    """DINO cross-entropy H(P_t, P_s) over crop pairs (Caron et al. 2021, eq. 3 and Alg. 1).

    student_out[i]: (B, K) student outputs for all crops (global first); teacher_out[j]: (B, K) teacher
    outputs for the global crops, j = 0..len(teacher_out) - 1, matching student crop j. center: (K,) or
    (1, K). P_t = softmax((t - center) / teacher_temp) is a constant (no gradient), log P_s =
    log_softmax(s / student_temp); the cross-entropy is summed over K, averaged over the batch and then
    over all pairs (j, i) with i != j. The centre update is the method's (see `dino_center`).
    """
    if not 1 <= len(teacher_out) <= len(student_out) or len(student_out) < 2:
        raise ValueError(
            f"dino_loss needs 1 <= len(teacher_out) <= len(student_out) and len(student_out) >= 2, "
            f"got {len(teacher_out)} and {len(student_out)}"
        )
    shape = student_out[0].shape
    if len(shape) != 2 or any(t.shape != shape for t in [*student_out, *teacher_out]):
        raise ValueError(
            f"dino_loss expects student and teacher outputs all (B, K) of one shape, got "
            f"{[tuple(t.shape) for t in student_out]} and {[tuple(t.shape) for t in teacher_out]}"
        )
    if center.shape not in {(shape[1],), (1, shape[1])}:
        raise ValueError(f"center must be ({shape[1]},) or (1, {shape[1]}), got {tuple(center.shape)}")
    _check_temperature("student_temp", student_temp)
    _check_temperature("teacher_temp", teacher_temp)
    c = _as_float(center.detach()).reshape(1, -1)  # (1, K)
    p_t = [F.softmax((_as_float(t.detach()) - c) / teacher_temp, dim=1) for t in teacher_out]  # each (B, K)
    log_p_s = [F.log_softmax(_as_float(s) / student_temp, dim=1) for s in student_out]  # each (B, K)
    total = student_out[0].new_zeros((), dtype=log_p_s[0].dtype)
    n_pairs = 0
    for j, p in enumerate(p_t):
        for i, log_p in enumerate(log_p_s):
            if i == j:
                continue
            total = total - (p * log_p).sum(dim=1).mean()
            n_pairs += 1
    return total / n_pairs


def dino_center(center: Tensor, teacher_out: list[Tensor], momentum: float = 0.9) -> Tensor:
    """New DINO centre c <- m c + (1 - m) mean of the teacher outputs (Caron et al. 2021, eq. 4).

    center: (K,) or (1, K); teacher_out: list of (B, K) teacher outputs of the global crops (gathered by
    the trainer). The mean runs over all rows of all crops; the result has center's shape and no gradient.
    """
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if not teacher_out:
        raise ValueError("dino_center needs at least one teacher output")
    k = center.shape[-1]
    if center.shape not in {(k,), (1, k)} or any(t.dim() != 2 or t.shape[1] != k for t in teacher_out):
        raise ValueError(
            f"dino_center expects center (K,) or (1, K) and teacher outputs (B, K), got "
            f"{tuple(center.shape)} and {[tuple(t.shape) for t in teacher_out]}"
        )
    batch_center = torch.cat([t.detach() for t in teacher_out]).mean(dim=0)  # (K,)
    new = center.detach() * momentum + batch_center.to(center.dtype) * (1 - momentum)  # (K,) or (1, K)
    return new.reshape(center.shape)


def _check_instdisc(v: Tensor, negatives: Tensor, n_data: int, temperature: float) -> None:
    if v.dim() != 2 or negatives.dim() != 3 or negatives.shape[::2] != v.shape:
        raise ValueError(
            f"expected v (N, D) and negatives (N, m, D), got {tuple(v.shape)}, {tuple(negatives.shape)}"
        )
    _check_noise(negatives.shape[1], n_data, temperature)


def _check_noise(m: int, n_data: int, temperature: float) -> None:
    if m < 1:
        raise ValueError("need at least one noise sample per row (m >= 1)")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")
    _check_temperature("temperature", temperature)


def _noise_cosines(v: Tensor, negatives: Tensor) -> Tensor:
    """v_n . negatives_nj for l2-normalised rows: (N, D), (N, m, D) -> (N, m)."""
    v_neg = F.normalize(_as_float(negatives.detach()).to(v.dtype), dim=2)  # (N, m, D)
    return torch.einsum("nd,nmd->nm", v, v_neg)


def instdisc_partition(v: Tensor, negatives: Tensor, n_data: int, temperature: float = 0.07) -> float:
    """Monte Carlo estimate of the constant Z of Instance Discrimination (Wu et al. 2018, Sec. 3.2).

    Z ~= n * E_j[exp(v_j . v / T)], the expectation taken over all N * m noise samples of the batch.
    v: (N, D) features, negatives: (N, m, D) memory-bank entries drawn uniformly; both l2-normalised here.
    The method computes it once, on its first batch, and keeps it.
    """
    _check_instdisc(v, negatives, n_data, temperature)
    with torch.no_grad():
        cosines = _noise_cosines(F.normalize(_as_float(v), dim=1), negatives)  # (N, m)
        return instdisc_partition_from_cosines(cosines, n_data, temperature)


def instdisc_partition_from_cosines(noise_cosines: Tensor, n_data: int, temperature: float = 0.07) -> float:
    """`instdisc_partition` from the cosines (N, m) between each feature and its noise entries."""
    if noise_cosines.dim() != 2:
        raise ValueError(f"expected noise cosines (N, m), got {tuple(noise_cosines.shape)}")
    _check_noise(noise_cosines.shape[1], n_data, temperature)
    s = _as_float(noise_cosines.detach()).double() / temperature  # (N, m)
    return float(n_data * torch.exp(s).mean())


def instdisc_nce(
    v: Tensor,
    positives: Tensor,
    negatives: Tensor,
    n_data: int,
    z: float,
    temperature: float = 0.07,
) -> Tensor:
    """NCE objective of Instance Discrimination (Wu et al. 2018, Sec. 3.2), mean over the batch.

    v: (N, D) features f(x_i); positives: (N, D) memory-bank entries v_i of the same instances;
    negatives: (N, m, D) memory-bank entries drawn from the uniform noise P_n = 1/n (n = n_data).
    All are l2-normalised here; memory-bank entries are constants (no gradient).
    P(i|v) = exp(v_i . v / T) / Z with the constant z (see `instdisc_partition`),
    h(i, v) = P(i|v) / (P(i|v) + m P_n), and per sample -log h(i, v) - sum_{m noise} log(1 - h(i, v')),
    i.e. J_NCE = -E_{P_d}[log h] - m E_{P_n}[log(1 - h)], in log space for stability.
    """
    _check_instdisc(v, negatives, n_data, temperature)
    if positives.shape != v.shape:
        raise ValueError(f"positives must match v's shape {tuple(v.shape)}, got {tuple(positives.shape)}")
    v = F.normalize(_as_float(v), dim=1)  # (N, D)
    v_pos = F.normalize(_as_float(positives.detach()).to(v.dtype), dim=1)  # (N, D)
    return instdisc_nce_from_cosines(
        (v * v_pos).sum(dim=1), _noise_cosines(v, negatives), n_data, z, temperature
    )


def instdisc_nce_from_cosines(
    positive_cosines: Tensor, noise_cosines: Tensor, n_data: int, z: float, temperature: float = 0.07
) -> Tensor:
    """`instdisc_nce` from the cosines of each feature with its own entry (N,) and its noise draws (N, m).

    The method scores its noise draws against the whole bank in one matrix product where that is cheaper
    than gathering (N, m, D) entries, and comes here with the cosines.
    """
    if positive_cosines.dim() != 1 or noise_cosines.dim() != 2 or len(noise_cosines) != len(positive_cosines):
        raise ValueError(
            f"expected positive cosines (N,) and noise cosines (N, m), got "
            f"{tuple(positive_cosines.shape)}, {tuple(noise_cosines.shape)}"
        )
    m = noise_cosines.shape[1]
    _check_noise(m, n_data, temperature)
    if z <= 0:
        raise ValueError(f"z must be > 0, got {z}")
    log_noise = math.log(z * m / n_data)  # log(Z m P_n): h = sigmoid(s / T - log(Z m P_n))
    x_pos = _as_float(positive_cosines) / temperature - log_noise  # (N,)
    x_neg = _as_float(noise_cosines) / temperature - log_noise  # (N, m)
    return -(F.logsigmoid(x_pos) + F.logsigmoid(-x_neg).sum(dim=1)).mean()
