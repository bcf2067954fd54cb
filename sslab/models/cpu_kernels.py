"""Two places where a CNN's step on a CPU avoids a slow path of torch's own kernels.

1. **Weight gradients of convolutions with small outputs, by one matrix product.** On a CPU with AMX, oneDNN's
   bf16 weight gradient of a convolution whose output is at most 4 x 4 ran at 65-180 GFLOP/s, a fraction of
   its forward pass (benchmarks/conv_weight_grad.py): the small CNN's last layer (8 -> 4 px) and all of a
   CIFAR ResNet-18's layer4. The same gradient as one matrix product of the output gradient and the input's
   patches, (C_out, N*L) @ (N*L, k*k*C_in), ran 2-6x faster there. On a CPU with AVX512-BF16 but no AMX
   (AMD Zen), oneDNN's weight gradient at 4 x 4 ran at 90-300 GFLOP/s and the product at 150-320: the rule
   there takes the 4 x 4 outputs only (with ResNet-18's 8 x 8 ones too, its step ran 0.91x). On an AVX-512
   CPU without native bf16 (where sslab computes in fp32), oneDNN's fp32 weight gradient at 4 x 4 ran at
   80-150 GFLOP/s and the product at 145-235: there fp32 takes the 4 x 4 outputs. Everything else (larger
   outputs, fp32 on the other kinds, bf16 without native support, CUDA) keeps oneDNN's kernel, which
   measured as fast or faster where it was measured.
2. **Global average pooling that hands back a channels-last gradient.** `AdaptiveAvgPool2d`'s backward
   returns an NCHW gradient for a channels-last input, and every element-wise backward after it (the last
   ReLU's, a residual add's) then mixes two layouts, about 20x slower than in one (the small CNN's last ReLU
   at batch 512, in torch.profiler). The forward pass is unchanged.

Both leave the model's parameters, state dict, forward values and initialisation as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from sslab.runtime import X86_AMX, X86_AVX512_BF16, x86_bf16_kind

# Where the matrix product measured faster (benchmarks/conv_weight_grad.py, bf16): on AMX, every output of
# at most 4 x 4, and outputs of 8 x 8 with at least 128 input channels (ResNet-18's layer3: 1.2-2x); oneDNN
# stayed faster at 8 x 8 with 64 input channels (the small CNN's middle layer) and at 16 x 16 and up. On
# AVX512-BF16 without AMX, the 4 x 4 outputs only (ResNet-18's layer3 stride-1 convolutions: 0.7-0.9x).
# In fp32, on AVX-512 without native bf16, the 4 x 4 outputs (ResNet-18's layer3 at 8 x 8: 0.87-1.43x).
GEMM_WEIGHT_GRAD_MAX_OUTPUT_AREA = 16
GEMM_WEIGHT_GRAD_WIDE_OUTPUT_AREA, GEMM_WEIGHT_GRAD_WIDE_IN_CHANNELS = 64, 128
AMX, AVX512_BF16 = X86_AMX, X86_AVX512_BF16
AVX512 = "avx512"  # AVX-512 without native bf16
_forced: bool | None = None  # set by gemm_weight_grad() to compare the two kernels in one process


@functools.cache
def cpu_kind() -> str | None:
    """AMX, AVX512_BF16, AVX512 or None: which of the rule's measured CPU kinds this CPU is."""
    native = x86_bf16_kind()
    if native is not None:
        return native
    return AVX512 if torch.backends.cpu.get_cpu_capability() == "AVX512" else None


@contextmanager
def gemm_weight_grad(enabled: bool | None) -> Iterator[None]:
    """Force the matrix-product weight gradient on (True: on any CPU, for every shape the AMX rule takes in
    bf16 and the AVX512 rule takes in fp32) or off (False); None restores this CPU's rule. For benchmarks
    and tests."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def output_area(conv: nn.Conv2d, x: torch.Tensor) -> int:
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    ph, pw = cast(tuple[int, int], conv.padding)  # a string padding ('same') never takes this path
    return ((x.shape[-2] + 2 * ph - kh) // sh + 1) * ((x.shape[-1] + 2 * pw - kw) // sw + 1)


def uses_gemm_weight_grad(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether this convolution's weight gradient is computed as one matrix product for this input."""
    if _forced is False or x.device.type != "cpu" or x.dim() != 4:
        return False
    if not (torch.is_grad_enabled() and conv.weight.requires_grad):
        return False
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return False
    autocast = torch.is_autocast_enabled("cpu")
    compute_dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    if compute_dtype == torch.float32:
        takes_fp32 = _forced is True or cpu_kind() == AVX512
        return takes_fp32 and output_area(conv, x) <= GEMM_WEIGHT_GRAD_MAX_OUTPUT_AREA
    if compute_dtype != torch.bfloat16:
        return False
    kind = AMX if _forced is True else cpu_kind()
    if kind not in (AMX, AVX512_BF16):
        return False
    area = output_area(conv, x)
    if area <= GEMM_WEIGHT_GRAD_MAX_OUTPUT_AREA:
        return True
    wide = conv.in_channels >= GEMM_WEIGHT_GRAD_WIDE_IN_CHANNELS and area <= GEMM_WEIGHT_GRAD_WIDE_OUTPUT_AREA
    return kind == AMX and wide


def patches(
    x: torch.Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """(N, C, H, W) -> (N*OH*OW, kh*kw*C): each output position's input window, channels fastest, as the
    rows of a matrix (the copy is cheap from a channels-last input, whose channels are already fastest)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    channels = x.shape[1]
    x = x.permute(0, 2, 3, 1)  # N, H, W, C
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    windows = x.unfold(1, kh, sh).unfold(2, kw, sw)  # N, OH, OW, C, kh, kw
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * channels)


def conv_weight_grad(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """dL/dW of `conv2d(x, W, stride, padding)` (no groups, no dilation) given dL/dy, as one matrix product:
    (C_out, N*OH*OW) @ (N*OH*OW, kh*kw*C_in). Returns (C_out, C_in, kh, kw) with channels-last strides."""
    out_channels = grad_output.shape[1]
    kh, kw = kernel_size
    g = grad_output.permute(0, 2, 3, 1).reshape(-1, out_channels)  # (N*OH*OW, C_out)
    w = g.t() @ patches(x, kernel_size, stride, padding)  # (C_out, kh*kw*C_in)
    return w.view(out_channels, kh, kw, x.shape[1]).permute(0, 3, 1, 2)


class _ConvGemmWeightGrad(torch.autograd.Function):
    """conv2d: forward and input gradient by torch's kernels, the weight gradient by `conv_weight_grad`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
    ) -> torch.Tensor:
        weight_dtype = weight.dtype
        if torch.is_autocast_enabled("cpu"):  # cast as autocast would for a convolution
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            y = torch.ops.aten.convolution(x, weight, None, stride, padding, (1, 1), False, (0, 0), 1)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.weight_dtype = stride, padding, weight_dtype  # type: ignore[attr-defined]
        return y

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        stride, padding = ctx.stride, ctx.padding  # type: ignore[attr-defined]
        grad_output = grad_output.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_x = torch.ops.aten.convolution_backward(
                grad_output, x, weight, None, stride, padding, (1, 1), False, (0, 0), 1, (True, False, False)
            )[0]
        grad_w = conv_weight_grad(grad_output, x, weight.shape[-2:], stride, padding)
        return grad_x, grad_w.to(ctx.weight_dtype), None, None  # type: ignore[attr-defined]


class Conv2d(nn.Conv2d):
    """nn.Conv2d, with the weight gradient of `uses_gemm_weight_grad` convolutions by one matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_gemm_weight_grad(self, x):
            return _ConvGemmWeightGrad.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity whose backward makes a 4-d gradient channels-last."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """AdaptiveAvgPool2d(1) whose gradient keeps a channels-last input's layout."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
            x = _ChannelsLastGrad.apply(x)
        return super().forward(x)


def adopt(model: nn.Module) -> nn.Module:
    """Make every plain nn.Conv2d of `model` a `Conv2d` (same parameters and state dict). Returns `model`."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = Conv2d
    return model
