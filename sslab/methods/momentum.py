"""Momentum (key / target / teacher) encoders and the MoCo queue, shared by the methods that use them."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslab.losses import info_nce
from sslab.methods.base import Gather


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that the optimiser never updates (requires_grad False everywhere)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, for parameters and floating buffers.

    Integer buffers (batch-norm's num_batches_tracked) are copied. Both modules must share one structure.
    """
    t: Tensor  # parameters in the first loop, buffers in the second
    o: Tensor
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - tau)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(o, 1.0 - tau)
        else:
            t.copy_(o)


def cosine_momentum(tau_base: float, progress: float) -> float:
    """BYOL's schedule tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, with progress = k / K in [0, 1]."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1.0) / 2.0


def momentum_at(ema: float, cosine: bool, progress: float) -> float:
    """The momentum tau after a fraction `progress` of training: constant `ema`, or cosine up to 1."""
    return cosine_momentum(ema, progress) if cosine else ema


class KeyQueue(nn.Module):
    """MoCo's dictionary: a FIFO queue of K l2-normalised keys (K, D), kept in buffers (checkpointed).

    It starts with random unit vectors, as in MoCo's code; each enqueue overwrites the oldest keys.
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replace the oldest entries with `keys` (N, D), wrapping around the end of the queue."""
        size = self.keys.shape[0]
        keys = F.normalize(keys.detach().float(), dim=1)[-size:]  # only the newest K fit
        slots = (self.ptr + torch.arange(keys.shape[0], device=keys.device)) % size  # (N,)
        self.keys[slots] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)


SHUFFLE_BN_GROUP = 32  # MoCo trained batch 256 on 8 GPUs: batch-norm statistics over 32 images each


@torch.no_grad()
def shuffled_bn_forward(
    encoder: Callable[[Tensor], Tensor], x: Tensor, group: int = SHUFFLE_BN_GROUP, synced: int = 1
) -> Tensor:
    """MoCo's shuffling BN (Sec. 3.3) on one device, for the key encoder.

    The batch x (N, ...) is shuffled and split into sub-batches of about `group` images, each with its own
    batch-norm statistics, so a query and its positive key never share statistics (which would let the
    pretext task be solved from them). Returns the (N, D) outputs in input order.
    `synced` processes whose synchronised batch-norm joins their i-th sub-batches: each process then splits
    its share into as many sub-batches as one process splits the global batch, so a joined sub-batch still
    holds about `group` images.
    """
    groups = max(1, min(x.shape[0], x.shape[0] * synced // group))
    order = torch.randperm(x.shape[0], device=x.device)  # (N,)
    outputs = torch.cat([encoder(part) for part in x[order].tensor_split(groups)])  # (N, D), shuffled
    return outputs[torch.argsort(order)]


class MomentumContrast(nn.Module):
    """MoCo's key encoder (an EMA copy of backbone + head) and queue, with the symmetrised InfoNCE.

    Used by MoCo v1/v2 and by SimCLR v2's memory. With queue_size 0 the other keys of the (global) batch are
    the negatives. `shuffle_bn` runs the key encoder with shuffling BN (MoCo); without it the key encoder's
    batch-norm sees the whole batch (SimCLR's global BN). `sync_bn`: the trainer synchronises batch-norm
    over processes (the trial's sync_bn), which shuffling BN's sub-batches allow for.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        out_dim: int,
        settings: Mapping[str, Any],
        shuffle_bn: bool,
        sync_bn: bool = False,
    ) -> None:
        """`settings`: the method's `queue_size`, `temperature`, `ema` and `ema_cosine`."""
        super().__init__()
        self.temperature, self.ema = settings["temperature"], settings["ema"]
        self.ema_cosine = settings["ema_cosine"]
        self.shuffle_bn, self.sync_bn = shuffle_bn, sync_bn
        self.backbone = frozen_copy(backbone)
        self.head = frozen_copy(head)
        size = settings["queue_size"]
        self.queue = KeyQueue(size, out_dim) if size > 0 else None

    @torch.no_grad()
    def encode_keys(self, x: Tensor, processes: int = 1) -> Tensor:
        """Keys k = f_k(x) (N, D) of a batch of views (this process's share of `processes`), no gradient."""

        def encode(v: Tensor) -> Tensor:
            return self.head(self.backbone(v))

        if not self.shuffle_bn:
            return encode(x)
        return shuffled_bn_forward(encode, x, synced=processes if self.sync_bn else 1)

    def loss(self, q1: Tensor, q2: Tensor, x1: Tensor, x2: Tensor, gather: Gather) -> Tensor:
        """1/2 [L(q1, k2) + L(q2, k1)] against the queue; then the global batch's keys are enqueued.

        q1, q2: (N, D) queries of the views x1, x2; `gather` collects keys over training processes.
        """
        k1, k2 = self.encode_keys(torch.cat([x1, x2]), gather.world_size).chunk(2)  # (N, D) each
        t = self.temperature
        if self.queue is None:  # in-batch negatives: every key of the global batch
            offset = gather.offset(len(q1))
            k1_all, k2_all = gather(k1), gather(k2)  # (M, D) each
            return (info_nce(q1, k2_all, None, t, offset) + info_nce(q2, k1_all, None, t, offset)) / 2
        loss = (info_nce(q1, k2, self.queue.keys, t) + info_nce(q2, k1, self.queue.keys, t)) / 2
        self.queue.enqueue(torch.cat([gather(k1), gather(k2)]))  # every process keeps the same queue
        return loss

    def update(self, backbone: nn.Module, head: nn.Module, progress: float) -> None:
        """Momentum update theta_k <- m theta_k + (1 - m) theta_q."""
        tau = momentum_at(self.ema, self.ema_cosine, progress)
        ema_update(self.backbone, backbone, tau)
        ema_update(self.head, head, tau)
