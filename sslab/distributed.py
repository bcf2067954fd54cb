"""Multi-process training under torchrun: the process group, a differentiable all-gather, gradient
averaging and synchronised batch-norm.

torchrun starts one process per device and describes the group in the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every helper here is a no-op in a single process.

Gradient convention: process r computes the loss L_r of its share of the global batch, and the loss of the
global batch is L = (1/W) sum_r L_r. Values shared across processes (gathered embeddings, batch-norm
statistics) pass their gradient back with a sum over processes, so process r ends up with the gradient of
sum_s L_s through its own inputs; averaging the parameter gradients over the W processes then gives
exactly dL/dtheta, the gradient of one process on the global batch.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _BatchNorm

from sslab.errors import ConfigError
from sslab.methods.base import Gather
from sslab.settings import MethodInfo

# The other processes wait at a collective while the main one evaluates alone (baseline and final probe).
TIMEOUT = timedelta(hours=2)
_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process reports progress, writes checkpoints and records results."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes and return this process's device.

    CUDA processes use NCCL, each on cuda:LOCAL_RANK; CPU processes use gloo. Outside torchrun (or with
    WORLD_SIZE=1) nothing is initialised and `device` is returned as it is. Calling it again is harmless.
    """
    if not launched():
        return device
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch multi-process runs with torchrun"
        )
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"multi-process training runs on CUDA or CPU devices, not {device.type}; use --device cpu"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    return device


def _shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def check_method(info: MethodInfo) -> None:
    """Refuse, in several processes, a method not shown to compute there what one process computes."""
    if world_size() > 1 and not info.multiprocess:
        raise ConfigError(
            f"method {info.name} has not been shown to match one process on the global batch, so it runs "
            "in one process only; start it without torchrun (or with --nproc-per-node 1)"
        )


def local_batch_size(batch_size: int) -> int:
    """This process's share of the global batch; the global batch must split evenly."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} (the global batch) must be divisible by the {world} processes; "
            f"use a multiple of {world}"
        )
    return batch_size // world


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's (N, ...) tensor; the gradient of a process's rows is summed over all."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts)  # (W * N, ...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process's loss saw these rows
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over processes; the gradient is summed over processes too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather of rows (N, ...) -> (W * N, ...) in rank order, differentiable; identity in one process."""
    return _GatherRows.apply(x) if world_size() > 1 else x


class ProcessGather(Gather):
    """The gather that the trainer gives a method under torchrun."""

    def __init__(self) -> None:
        self.rank = rank()
        self.world_size = world_size()

    def __call__(self, x: Tensor) -> Tensor:
        return gather_with_grad(x)

    def sum(self, x: Tensor) -> Tensor:
        return _AllReduceSum.apply(x)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of a tensor over processes (no gradient); `x` itself in one process."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def average_gradients(module: nn.Module) -> None:
    """Replace every parameter gradient with its mean over processes (one all-reduce per dtype)."""
    world = world_size()
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for parameter in module.parameters():
        if parameter.grad is not None:
            by_dtype.setdefault(parameter.grad.dtype, []).append(parameter.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)


def broadcast_module(module: nn.Module) -> None:
    """Copy the main process's parameters and buffers to every process."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (picklable objects)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


class SyncBatchNorm(_BatchNorm):
    """Batch-norm whose training statistics cover the batches of all processes, on any device and backend.

    torch's nn.SyncBatchNorm refuses CPU tensors, so CPU (gloo) runs use this one: per-channel sums are
    combined with a differentiable all-reduce (two passes: mean, then centred squares, for accuracy).
    In eval mode, or in one process, it is plain batch-norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1, *([1] * (input.dim() - 2))]
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # half precision in float32
        local_count = x.new_tensor([input.numel() // input.shape[1]])
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), local_count]))  # (C + 1,)
        count = sums[-1].detach()
        mean = sums[:-1] / count  # (C,)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count  # (C,) biased, as batch-norm uses
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                tracked = cast(Tensor, self.num_batches_tracked)  # registered with the running statistics
                tracked.add_(1)
                momentum = 1.0 / float(tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every batch-norm layer in `module` with a synchronised one, keeping its parameter and
    buffer objects (so optimisers and momentum-encoder pairs built earlier stay valid).

    CUDA uses torch's nn.SyncBatchNorm (fused kernels); other devices use `SyncBatchNorm` above.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm | nn.SyncBatchNorm):
        synced = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean = module.running_mean
        synced.running_var = module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
