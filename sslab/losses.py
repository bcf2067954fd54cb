"""Self-supervised losses as pure functions of tensors and hyperparameters.

State such as queues, centres and momentum encoders belongs to the methods; nothing here keeps any.
Every loss runs in float32 (float64 stays) with autocast off (`full_precision`): similarities divided by
temperatures of 0.04-0.5 need more than bf16's 8-bit mantissa (three significant digits).
A loss whose statistics cover the whole batch (Barlow Twins' cross-correlation, SwAV's codes, DINO's centre)
takes the training `processes` (the step's gather) when each process holds an equal share of the batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")


class Processes(Protocol):
    """The training processes a loss's batch statistics are summed over (`sslab.methods.base.Gather`)."""

    rank: int
    world_size: int

    def __call__(self, x: Tensor) -> Tensor: ...  # all-gather of rows (N, ...) -> (world_size * N, ...)

    def sum(self, x: Tensor) -> Tensor: ...  # sum over the processes, gradient summed too


def full_precision(loss: Callable[P, R]) -> Callable[P, R]:
    """Run `loss` with autocast off and its half-precision tensor arguments (also in lists) in float32.

    Outside autocast the call is unchanged, so fp32 training computes exactly what it did.
    """

    @functools.wraps(loss)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, list) else [a])]
        device = next((t.device.type for t in tensors if isinstance(t, Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device):
            return loss(*args, **kwargs)
        cast: dict[int, Tensor] = {}  # one float32 copy per tensor, so `a is b` between arguments holds

        def upcast(a: Any) -> Any:
            if isinstance(a, list):
                return [upcast(t) for t in a]
            if isinstance(a, Tensor) and a.is_floating_point():
                return cast.setdefault(id(a), _as_float(a))
            return a

        with torch.autocast(device, enabled=False):
            return loss(*upcast(list(args)), **{k: upcast(v) for k, v in kwargs.items()})

    return run


@full_precision
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


@full_precision
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


@full_precision
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


@full_precision
def negative_cosine(p: Tensor, z: Tensor, stop_gradient: bool = True) -> Tensor:
    """SimSiam D(p, sg(z)) = -cos(p, z) (Chen & He 2021, eqs. 1 and 3), mean over the batch.

    p: (N, D) predictions, z: (N, D) projections of the other view. The method symmetrises as
    1/2 D(p1, z2) + 1/2 D(p2, z1). stop_gradient=False is the paper's no-stop-gradient ablation.
    """
    _check_pair("negative_cosine", p, z)
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(_as_float(p), _as_float(z), dim=1).mean()


@full_precision
def barlow_twins(
    z1: Tensor, z2: Tensor, lambd: float = 5e-3, eps: float = 1e-5, processes: Processes | None = None
) -> Tensor:
    """Barlow Twins redundancy reduction (Zbontar et al. 2021, eqs. 1-2).

    z1, z2: (N, D) embeddings of the two views. Each dimension is standardised over the batch with the
    biased (1/N) variance, (z - mean) / sqrt(var + eps), as the reference BatchNorm1d(affine=False) does,
    so C = z1n.T @ z2n / N is the cross-correlation matrix (D, D) and the loss is
    sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2. Symmetric in (z1, z2) since C(z2, z1) = C(z1, z2).T.
    With several `processes`, z1 and z2 are this process's equal share of the global batch: the means,
    variances and C are those of the global batch (the reference's synchronised BatchNorm1d and
    all_reduce(c)), with gradients, so every process computes the global batch's loss.
    """
    _check_pair("barlow_twins", z1, z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"barlow_twins needs a batch of at least 2 to standardise, got N={n}")
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0, got {lambd}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    def over_batch(x: Tensor) -> Tensor:  # a mean over this process's share -> over the global batch
        if processes is None or processes.world_size == 1:
            return x
        return processes.sum(x) / processes.world_size

    def standardise(z: Tensor) -> Tensor:
        z = _as_float(z)
        centred = z - over_batch(z.mean(dim=0))  # (N, D)
        return centred / torch.sqrt(over_batch(centred.pow(2).mean(dim=0)) + eps)  # (N, D)

    z1n, z2n = standardise(z1), standardise(z2)  # (N, D) each
    dtype = torch.promote_types(z1n.dtype, z2n.dtype)
    c = over_batch(z1n.to(dtype).T @ z2n.to(dtype) / n)  # (D, D)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@full_precision
@torch.no_grad()
def sinkhorn(
    scores: Tensor, epsilon: float = 0.05, iterations: int = 3, processes: Processes | None = None
) -> Tensor:
    """Sinkhorn-Knopp codes of SwAV (Caron et al. 2020, Sec. 3.1 and the appendix pseudo-code).

    scores: (B, K) = z @ prototypes.T for all B samples that share the equipartition constraint (gathered
    by the trainer). Q = exp(scores / epsilon).T (K, B) is normalised to sum 1, then rows (prototypes) are
    scaled to sum 1/K and columns (samples) to sum 1/B, `iterations` times; returns the codes Q.T * B
    (B, K), whose rows sum to 1 and columns to about B/K. No gradient; the scalings run on log Q in float64
    (logsumexp, so exp never overflows or underflows a whole row), the result has the input's dtype
    (at least float32).
    With several `processes`, scores are this process's columns of the batch (any number per process) and
    the sums over samples cover every process's, B counting them all, as SwAV's distributed_sinkhorn
    all-reduces them; each process gets the codes of its own columns.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn expects scores of shape (B, K), got {tuple(scores.shape)}")
    _check_temperature("epsilon", epsilon)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    b, k = scores.shape
    several = processes is not None and processes.world_size > 1

    def over_batch(log_sum: Tensor) -> Tensor:  # log of a sum over this process's samples -> over all
        if processes is None or not several:
            return log_sum
        return torch.logsumexp(processes(log_sum.reshape(1, -1)), dim=0).reshape(log_sum.shape)

    if processes is not None and several:
        b = int(processes.sum(torch.tensor(b, device=scores.device)))  # B of the global batch
    log_q = scores.detach().double().T / epsilon  # (K, B), log of Q = exp(scores / epsilon).T
    log_q = log_q - over_batch(torch.logsumexp(log_q.flatten(), dim=0))  # Q sums to 1
    for _ in range(iterations):
        rows = over_batch(torch.logsumexp(log_q, dim=1, keepdim=True))  # (K, 1)
        log_q = log_q - rows - math.log(k)  # prototype rows sum to 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)  # sample columns sum to 1/B
    q = torch.exp(log_q)  # (K, B)
    return (q * b).T.to(_as_float(scores).dtype)  # (B, K)


@full_precision
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


@full_precision
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


@full_precision
def dino_center(
    center: Tensor, teacher_out: list[Tensor], momentum: float = 0.9, processes: Processes | None = None
) -> Tensor:
    """New DINO centre c <- m c + (1 - m) mean of the teacher outputs (Caron et al. 2021, eq. 4).

    center: (K,) or (1, K); teacher_out: list of (B, K) teacher outputs of the global crops. The mean runs
    over all rows of all crops, and with several `processes` (each holding an equal share of the batch)
    over those of every process, as DINO's code all-reduces the batch centre; the result has center's
    shape and no gradient.
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
    if processes is not None and processes.world_size > 1:
        batch_center = processes.sum(batch_center) / processes.world_size  # of the global batch
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


@full_precision
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


@full_precision
def instdisc_partition_from_cosines(noise_cosines: Tensor, n_data: int, temperature: float = 0.07) -> float:
    """`instdisc_partition` from the cosines (N, m) between each feature and its noise entries."""
    if noise_cosines.dim() != 2:
        raise ValueError(f"expected noise cosines (N, m), got {tuple(noise_cosines.shape)}")
    _check_noise(noise_cosines.shape[1], n_data, temperature)
    s = _as_float(noise_cosines.detach()).double() / temperature  # (N, m)
    return float(n_data * torch.exp(s).mean())


@full_precision
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


@full_precision
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


def seed_loss(
    z_s: Tensor,
    z_t: Tensor,
    queue: Tensor,
    student_temperature: float = 0.2,
    teacher_temperature: float = 1e-4,
) -> Tensor:
    """SEED's distillation loss (Fang et al. 2021; its code's soft cross-entropy), mean over the N samples.

    z_s: (N, D) student embeddings, z_t: (N, D) the frozen teacher's embeddings of the same images, queue
    (K, D) earlier teacher embeddings; all l2-normalised here, teacher and queue constants. Each sample is
    scored against D+ = [z_t_n; queue] (its own teacher embedding first, as in the official code):
    p^T_n = softmax(z_t_n . D+ / tau_T), p^S_n = softmax(z_s_n . D+ / tau_S), loss -sum_j p^T_nj log p^S_nj.
    Computed in float32 with autocast off: tau_T ~ 1e-4 would turn the 2^-8 rounding of a bf16 cosine into
    logit errors of ~40.
    """
    _check_pair("seed_loss", z_s, z_t)
    if queue.dim() != 2 or queue.shape[1] != z_s.shape[1]:
        raise ValueError(f"queue must be (K, {z_s.shape[1]}), got {tuple(queue.shape)}")
    _check_temperature("student_temperature", student_temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    with torch.autocast(z_s.device.type, enabled=False):
        s = F.normalize(_as_float(z_s), dim=1)  # (N, D)
        t = F.normalize(_as_float(z_t.detach()).to(s.dtype), dim=1)  # (N, D)
        q = F.normalize(_as_float(queue.detach()).to(s.dtype), dim=1)  # (K, D)
        logits_s = torch.cat([(s * t).sum(dim=1, keepdim=True), s @ q.T], dim=1)  # (N, 1 + K)
        logits_t = torch.cat([(t * t).sum(dim=1, keepdim=True), t @ q.T], dim=1)  # (N, 1 + K)
        p_t = F.softmax(logits_t / teacher_temperature, dim=1)  # (N, 1 + K)
        return -(p_t * F.log_softmax(logits_s / student_temperature, dim=1)).sum(dim=1).mean()


@full_precision
def distillation_kl(z_s: Tensor, z_t: Tensor, temperature: float = 0.2) -> Tensor:
    """The distillation loss of S2-BNN (Shen et al. 2021, "distillation only"), mean over the N samples.

    z_s, z_t: (N, D) student and frozen-teacher head outputs of the same images, l2-normalised here (the
    official code normalises both). Each row, divided by tau, is a softmax over its D output dimensions:
    KL(p^T || p^S) = sum_d p^T_d (log p^T_d - log p^S_d). The official code minimises the cross-entropy
    -sum_d p^T_d log p^S_d, which differs by the teacher's entropy, a constant: the same gradient, and a loss
    that is 0 when the student matches.
    """
    _check_pair("distillation_kl", z_s, z_t)
    _check_temperature("temperature", temperature)
    s = F.normalize(_as_float(z_s), dim=1)  # (N, D)
    t = F.normalize(_as_float(z_t.detach()).to(s.dtype), dim=1)  # (N, D)
    log_p_s = F.log_softmax(s / temperature, dim=1)  # (N, D)
    log_p_t = F.log_softmax(t / temperature, dim=1)  # (N, D)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def _check_gathered(name: str, local: Tensor, gathered: Tensor | None, rank_offset: int) -> Tensor:
    """`gathered` (M, D) holding `local` (N, D) at rows rank_offset..rank_offset + N - 1; `local` if None."""
    if gathered is None:
        if rank_offset != 0:
            raise ValueError(f"{name}: rank_offset applies only to gathered rows, got {rank_offset}")
        return local
    if gathered.dim() != 2 or gathered.shape[1] != local.shape[1]:
        raise ValueError(f"{name}: gathered rows must be (M, {local.shape[1]}), got {tuple(gathered.shape)}")
    if not 0 <= rank_offset <= gathered.shape[0] - local.shape[0]:
        raise ValueError(
            f"{name}: rank_offset must lie in [0, M - N] = [0, {gathered.shape[0] - local.shape[0]}], "
            f"got {rank_offset}"
        )
    return gathered


@full_precision
def vicreg_variance(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg variance term v(Z) (Bardes et al. 2022, eq. 1): (1/d) sum_j max(0, gamma - S(z^j, eps)).

    z: (N, D) embeddings; S(x, eps) = sqrt(Var(x) + eps) is the unbiased (1/(N - 1)) standard deviation of
    dimension j over the batch, so the hinge keeps every dimension's spread at least gamma.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"vicreg_variance expects (N, D) embeddings with N >= 2, got {tuple(z.shape)}")
    if gamma <= 0 or eps < 0:
        raise ValueError(f"vicreg_variance needs gamma > 0 and eps >= 0, got {gamma}, {eps}")
    std = torch.sqrt(_as_float(z).var(dim=0) + eps)  # (D,)
    return F.relu(gamma - std).mean()


@full_precision
def vicreg_covariance(z: Tensor) -> Tensor:
    """VICReg covariance term c(Z) (Bardes et al. 2022, eqs. 3-4): (1/d) sum_{i != j} C(Z)_ij^2.

    z: (N, D); C(Z) = (Z - mean)^T (Z - mean) / (N - 1) is the (D, D) covariance over the batch: the term
    decorrelates the dimensions.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"vicreg_covariance expects (N, D) embeddings with N >= 2, got {tuple(z.shape)}")
    n, d = z.shape
    centred = _as_float(z) - _as_float(z).mean(dim=0)  # (N, D)
    cov = centred.T @ centred / (n - 1)  # (D, D)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


@full_precision
def vicreg_terms(
    z1: Tensor, z2: Tensor, gamma: float = 1.0, eps: float = 1e-4, processes: Processes | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The three VICReg terms (s, v, c) of two views, as the official code combines them.

    z1, z2: (N, D) expander outputs of the two views, row i of each from image i. Invariance s: the mean
    squared difference over all N x D entries (the official code's F.mse_loss; the paper's eq. 5 sums over
    the D dimensions, a factor D the published coefficients do not carry). Variance v: (v(Z1) + v(Z2)) / 2
    (the official code halves the paper's eq. 6 sum). Covariance c: c(Z1) + c(Z2).
    With several `processes`, z1 and z2 are this process's equal share of the global batch: the invariance
    is over the local rows (its mean over the processes is the global one), the variance and covariance
    over the views gathered from all processes (with gradients), as the official code's FullGatherLayer.
    """
    _check_pair("vicreg_terms", z1, z2)
    a, b = (z1, z2) if processes is None else (processes(z1), processes(z2))  # (M, D) each
    invariance = F.mse_loss(_as_float(z1), _as_float(z2))
    variance = (vicreg_variance(a, gamma, eps) + vicreg_variance(b, gamma, eps)) / 2
    covariance = vicreg_covariance(a) + vicreg_covariance(b)
    return invariance, variance, covariance


@full_precision
def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    lambd: float = 25.0,
    mu: float = 25.0,
    nu: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    processes: Processes | None = None,
) -> Tensor:
    """VICReg loss lambda s + mu v + nu c (Bardes et al. 2022, eq. 6) of the terms of `vicreg_terms`."""
    if min(lambd, mu, nu) < 0:
        raise ValueError(f"VICReg coefficients must be >= 0, got lambda={lambd}, mu={mu}, nu={nu}")
    s, v, c = vicreg_terms(z1, z2, gamma, eps, processes)
    return lambd * s + mu * v + nu * c


@full_precision
@torch.no_grad()
def nnclr_nearest_neighbour(z: Tensor, support: Tensor) -> Tensor:
    """NN(z, Q) of NNCLR (Dwibedi et al. 2021, eq. 2): the support-set row nearest to each embedding.

    z: (N, D) embeddings, support: (S, D) l2-normalised support set Q. argmin_q ||z / |z| - q|| is the row
    of highest inner product q . z, so the lookup is one (N, S) product. Returns (N, D) rows of `support`,
    constants (no gradient).
    """
    if z.dim() != 2 or support.dim() != 2 or z.shape[1] != support.shape[1] or len(support) == 0:
        raise ValueError(
            f"nnclr_nearest_neighbour expects z (N, D) and a non-empty support (S, D), got "
            f"{tuple(z.shape)}, {tuple(support.shape)}"
        )
    index = (_as_float(z) @ _as_float(support).T).argmax(dim=1)  # (N,)
    return support[index]


@full_precision
def nnclr_loss(
    nn: Tensor, p: Tensor, temperature: float = 0.1, p_all: Tensor | None = None, rank_offset: int = 0
) -> Tensor:
    """NNCLR's L(nn, p) (Dwibedi et al. 2021, eq. 2 and Algorithm 1), mean over the N rows of nn.

    nn: (N, D) nearest neighbours NN(z_i, Q) from the support set (constants), p: (N, D) predictions of the
    other view; both l2-normalised here. Row i's logits are nn_i . p_k / tau over the batch's predictions
    k, the positive at k = i: -log exp(nn_i . p_i / tau) / sum_k exp(nn_i . p_k / tau). The method
    symmetrises it as L(nn1, p2) / 2 + L(nn2, p1) / 2. Across processes p_all (M, D) are the gathered
    predictions (with gradients) and p = p_all[rank_offset : rank_offset + N].
    """
    _check_pair("nnclr_loss", nn, p)
    _check_temperature("temperature", temperature)
    candidates = F.normalize(_as_float(_check_gathered("nnclr_loss", p, p_all, rank_offset)), dim=1)  # (M, D)
    anchors = F.normalize(_as_float(nn.detach()), dim=1).to(candidates.dtype)  # (N, D)
    logits = anchors @ candidates.T / temperature  # (N, M)
    targets = torch.arange(rank_offset, rank_offset + len(nn), device=nn.device)  # (N,)
    return F.cross_entropy(logits, targets)


@full_precision
def invaspread_probabilities(
    f: Tensor, f_hat: Tensor, temperature: float = 0.1, f_all: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The instance probabilities of Ye et al. 2019 (eqs. 2 and 4), with the batch's original-image
    features f_k as the classifier weights.

    f: (N, D) features of the original images x_j, f_hat: (N, D) of their augmentations x^_i; f_all (M, D)
    the originals of the whole (gathered) batch, f itself in one process; all l2-normalised here.
    Returns (P_hat, P), both (N, M): P_hat[i, k] = P(k | x^_i) = exp(f_k . f^_i / tau) / sum_l
    exp(f_l . f^_i / tau) and P[j, k] = P(k | x_j) = exp(f_k . f_j / tau) / sum_l exp(f_l . f_j / tau).
    Each row sums to 1 over k.
    """
    _check_pair("invaspread_probabilities", f, f_hat)
    _check_temperature("temperature", temperature)
    weights = F.normalize(_as_float(f if f_all is None else f_all), dim=1)  # (M, D)
    if weights.shape[1] != f.shape[1] or weights.shape[0] < f.shape[0]:
        raise ValueError(f"f_all must be (M >= N, {f.shape[1]}), got {tuple(weights.shape)}")
    anchors_hat = F.normalize(_as_float(f_hat), dim=1).to(weights.dtype)  # (N, D)
    anchors = F.normalize(_as_float(f), dim=1).to(weights.dtype)  # (N, D)
    return F.softmax(anchors_hat @ weights.T / temperature, dim=1), F.softmax(
        anchors @ weights.T / temperature, dim=1
    )


@full_precision
def invaspread_loss(
    f: Tensor,
    f_hat: Tensor,
    temperature: float = 0.1,
    f_all: Tensor | None = None,
    rank_offset: int = 0,
) -> Tensor:
    """Instance-wise softmax embedding of Ye et al. 2019 (eqs. 6-8), divided by the batch size.

    J = -sum_i log P(i | x^_i) - sum_i sum_{j != i} log(1 - P(i | x_j)), with the probabilities of
    `invaspread_probabilities`: the first term makes f^_i recognised as instance i (invariance), the second
    keeps every other original x_j from being recognised as i (spreading). Divided by N, as the official
    code divides by its batch, so the learning rate does not depend on the batch size.
    Across processes f_all (M, D) are the gathered originals (with gradients), f = f_all[rank_offset :
    rank_offset + N]: the local rows are the anchors x^_i and x_j, all M originals the instances, so the
    mean of the processes' losses is the global batch's.
    """
    weights = _check_gathered("invaspread_loss", f, f_all, rank_offset)
    n = f.shape[0]
    p_hat, p = invaspread_probabilities(f, f_hat, temperature, weights)  # (N, M) each
    rows = torch.arange(n, device=f.device)
    own = rows + rank_offset  # (N,) each anchor's instance among the M
    invariance = torch.log(p_hat[rows, own])  # (N,) log P(i | x^_i)
    others = torch.ones_like(p, dtype=torch.bool).index_put_(
        (rows, own), torch.tensor(False, device=f.device)
    )
    spreading = torch.log1p(-p.masked_fill(~others, 0)).sum(dim=1)  # (N,) sum_{i != j} log(1 - P(i | x_j))
    return -(invariance + spreading).sum() / n


@full_precision
def cmc_partition(scores: Tensor, n_data: int, temperature: float = 0.07) -> float:
    """CMC's NCE normaliser Z = n * mean(exp(s / T)) over a batch's (N, 1 + K) memory scores, positives
    included, as the official NCEAverage estimates it once, on the first batch (one Z per view)."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"cmc_partition expects scores (N, 1 + K) with K >= 1, got {tuple(scores.shape)}")
    _check_noise(scores.shape[1] - 1, n_data, temperature)
    return float(n_data * torch.exp(_as_float(scores.detach()).double() / temperature).mean())


@full_precision
def cmc_nce(
    scores_l: Tensor, scores_ab: Tensor, n_data: int, z_l: float, z_ab: float, temperature: float = 0.07
) -> Tensor:
    """CMC's two-view NCE loss L(V1, V2) = L^{V1,V2} + L^{V2,V1} (Tian et al. 2020, eqs. 2-4 and Sec. 3.2).

    scores_l: (N, 1 + K) cosines of the L view's features with the ab memory bank's entries [own image,
    K noise images], scores_ab: (N, 1 + K) of the ab features with the L memory's (memory entries are
    constants). Each view's term is the NCE of Instance Discrimination (`instdisc_nce_from_cosines`, the
    official NCECriterion) with P(i|v) = exp(s / T) / Z and uniform noise 1 / n over the n images.
    """
    if scores_l.shape != scores_ab.shape or scores_l.dim() != 2 or scores_l.shape[1] < 2:
        raise ValueError(
            f"cmc_nce expects two (N, 1 + K) score tensors of one shape, got {tuple(scores_l.shape)}, "
            f"{tuple(scores_ab.shape)}"
        )
    loss_l = instdisc_nce_from_cosines(scores_l[:, 0], scores_l[:, 1:], n_data, z_l, temperature)
    loss_ab = instdisc_nce_from_cosines(scores_ab[:, 0], scores_ab[:, 1:], n_data, z_ab, temperature)
    return loss_l + loss_ab


@full_precision
def cmc_softmax(scores_l: Tensor, scores_ab: Tensor, temperature: float = 0.07) -> Tensor:
    """CMC's softmax (InfoNCE) variant of `cmc_nce` (the official code's --softmax): for each view the
    cross-entropy of its (N, 1 + K) memory scores / T with the positive in column 0, summed over the views."""
    if scores_l.shape != scores_ab.shape or scores_l.dim() != 2 or scores_l.shape[1] < 2:
        raise ValueError(
            f"cmc_softmax expects two (N, 1 + K) score tensors of one shape, got {tuple(scores_l.shape)}, "
            f"{tuple(scores_ab.shape)}"
        )
    _check_temperature("temperature", temperature)
    targets = torch.zeros(len(scores_l), dtype=torch.long, device=scores_l.device)  # (N,)
    return sum(
        (F.cross_entropy(_as_float(s) / temperature, targets) for s in (scores_l, scores_ab)),
        start=scores_l.new_zeros((), dtype=_as_float(scores_l).dtype),
    )


@full_precision
def cmc_in_batch(
    z_l: Tensor,
    z_ab: Tensor,
    temperature: float = 0.07,
    z_l_all: Tensor | None = None,
    z_ab_all: Tensor | None = None,
    rank_offset: int = 0,
) -> Tensor:
    """CMC's two-view contrastive loss with the batch's other images as negatives (Tian et al. 2020, eq. 4,
    the "full graph" of two views): L^{L,ab} + L^{ab,L}, each mean over its N anchors.

    z_l, z_ab: (N, D) features of the L and ab views, row i of each from image i; l2-normalised here.
    L^{L,ab} = -log exp(z_l_i . z_ab_i / T) / sum_k exp(z_l_i . z_ab_k / T), and the same with the views
    swapped; gradients reach both views' candidates. Across processes z_l_all, z_ab_all (M, D) are the
    gathered views (with gradients) holding the local rows at rank_offset.
    """
    _check_pair("cmc_in_batch", z_l, z_ab)
    _check_temperature("temperature", temperature)
    if (z_l_all is None) != (z_ab_all is None):
        raise ValueError("cmc_in_batch expects z_l_all and z_ab_all together")
    l_all = F.normalize(_as_float(_check_gathered("cmc_in_batch", z_l, z_l_all, rank_offset)), dim=1)
    ab_all = F.normalize(_as_float(_check_gathered("cmc_in_batch", z_ab, z_ab_all, rank_offset)), dim=1)
    lum, ab = F.normalize(_as_float(z_l), dim=1), F.normalize(_as_float(z_ab), dim=1)  # (N, D)
    targets = torch.arange(rank_offset, rank_offset + len(z_l), device=z_l.device)  # (N,)
    loss_l = F.cross_entropy(lum @ ab_all.T / temperature, targets)  # anchors L, candidates ab: (N, M)
    loss_ab = F.cross_entropy(ab @ l_all.T / temperature, targets)  # anchors ab, candidates L: (N, M)
    return loss_l + loss_ab
