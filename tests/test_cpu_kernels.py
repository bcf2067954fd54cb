"""The CPU kernel choices of sslab/models/cpu_kernels.py: same gradients as torch's own, by the rule asked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslab.models import build_backbone, cpu_kernels


def _reference_weight_grad(
    x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, stride, padding
) -> torch.Tensor:
    """dL/dW in float64 by a slow loop over the kernel taps: sum over n, output positions of g * x window."""
    x, g = x.double(), g.double()
    out_c, in_c, kh, kw = w.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    oh, ow = g.shape[-2:]
    grad = torch.zeros(out_c, in_c, kh, kw, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i : i + stride[0] * oh : stride[0], j : j + stride[1] * ow : stride[1]]
            grad[:, :, i, j] = torch.einsum("nohw,nchw->oc", g, window)
    return grad


@pytest.mark.parametrize(
    ("in_c", "out_c", "size", "kernel", "stride", "padding"),
    [(5, 7, 8, 3, 2, 1), (4, 6, 4, 3, 1, 1), (3, 8, 9, 1, 2, 0), (2, 3, 7, (3, 1), (2, 1), (1, 0))],
)
def test_the_weight_gradient_by_one_matrix_product_is_the_convolutions(
    in_c, out_c, size, kernel, stride, padding
):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, bias=False)
    x = torch.randn(3, in_c, size, size).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(conv(x)).contiguous(memory_format=torch.channels_last)
    grad = cpu_kernels.conv_weight_grad(g, x, conv.kernel_size, conv.stride, conv.padding)
    assert grad.shape == conv.weight.shape
    expected = _reference_weight_grad(x, conv.weight, g, conv.stride, conv.padding)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)


def _grads(model: nn.Module, x: torch.Tensor, use_gemm: bool, bf16: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with cpu_kernels.gemm_weight_grad(use_gemm), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = model(x)
    (out.float() ** 2).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("bf16", "tolerance"), [(True, 0.02), (False, 1e-4)])
@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18"])
def test_a_backbone_trains_with_the_same_gradients_either_way(backbone, bf16, tolerance):
    """Forced on, the convolutions the rule picks take the matrix-product weight gradient, forced off all take
    torch's: the two must agree to rounding (bf16 products round their fp32 sums to bf16, in other orders)."""
    torch.manual_seed(0)
    model = build_backbone(backbone, 3, 32).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    small = [m for m in model.modules() if isinstance(m, cpu_kernels.Conv2d)]
    assert small, "the backbone's convolutions are cpu_kernels.Conv2d"
    reference = _grads(model, x, use_gemm=False, bf16=bf16)
    chosen = _grads(model, x, use_gemm=True, bf16=bf16)
    assert reference.keys() == chosen.keys()
    for name in reference:
        scale = reference[name].abs().max().clamp_min(1e-6)
        assert (chosen[name] - reference[name]).abs().max() / scale < tolerance, name


def test_the_rule_picks_convolutions_with_small_outputs_only():
    conv = cpu_kernels.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
    small, large = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 10, 10)  # outputs 4 x 4 and 5 x 5
    with cpu_kernels.gemm_weight_grad(True):
        with torch.autocast("cpu", torch.bfloat16):
            assert cpu_kernels.uses_gemm_weight_grad(conv, small)
            assert not cpu_kernels.uses_gemm_weight_grad(conv, large)
            with torch.no_grad():
                assert not cpu_kernels.uses_gemm_weight_grad(conv, small)
            wide = cpu_kernels.Conv2d(128, 4, 3, stride=2, padding=1, bias=False)
            assert cpu_kernels.uses_gemm_weight_grad(wide, torch.randn(2, 128, 16, 16))  # 8 x 8, 128 in
            assert not cpu_kernels.uses_gemm_weight_grad(wide, torch.randn(2, 128, 32, 32))  # 16 x 16
            narrow = cpu_kernels.Conv2d(64, 4, 3, stride=2, padding=1, bias=False)
            assert not cpu_kernels.uses_gemm_weight_grad(narrow, torch.randn(2, 64, 16, 16))  # 8 x 8, 64 in
        assert cpu_kernels.uses_gemm_weight_grad(conv, small), "fp32 takes the 4 x 4 outputs"
        assert not cpu_kernels.uses_gemm_weight_grad(conv, large)
        assert not cpu_kernels.uses_gemm_weight_grad(wide, torch.randn(2, 128, 16, 16)), "fp32: 4 x 4 only"
        assert not cpu_kernels.uses_gemm_weight_grad(conv.double(), small.double())
        assert cpu_kernels.uses_gemm_weight_grad(conv.to(torch.bfloat16), small.to(torch.bfloat16))
        biased = cpu_kernels.Conv2d(4, 4, 3, stride=2, padding=1).to(torch.bfloat16)
        assert not cpu_kernels.uses_gemm_weight_grad(biased, small.to(torch.bfloat16))
    with cpu_kernels.gemm_weight_grad(False), torch.autocast("cpu", torch.bfloat16):
        assert not cpu_kernels.uses_gemm_weight_grad(conv, small)


@pytest.mark.parametrize(
    ("kind", "takes_4x4", "takes_8x8_wide", "takes_4x4_in_fp32"),
    [
        (cpu_kernels.AMX, True, True, False),
        (cpu_kernels.AVX512_BF16, True, False, False),
        (cpu_kernels.AVX512, False, False, True),
        (None, False, False, False),
    ],
)
def test_each_cpu_kind_takes_the_shapes_measured_faster_on_it(
    monkeypatch, kind, takes_4x4, takes_8x8_wide, takes_4x4_in_fp32
):
    monkeypatch.setattr(cpu_kernels, "cpu_kind", lambda: kind)
    small = cpu_kernels.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
    wide = cpu_kernels.Conv2d(128, 4, 3, stride=2, padding=1, bias=False)
    assert cpu_kernels.uses_gemm_weight_grad(small, torch.randn(2, 4, 8, 8)) is takes_4x4_in_fp32
    with torch.autocast("cpu", torch.bfloat16):
        assert cpu_kernels.uses_gemm_weight_grad(small, torch.randn(2, 4, 8, 8)) is takes_4x4
        assert cpu_kernels.uses_gemm_weight_grad(wide, torch.randn(2, 128, 16, 16)) is takes_8x8_wide
        with cpu_kernels.gemm_weight_grad(True):  # forced: the AMX rule's shapes on any CPU
            assert cpu_kernels.uses_gemm_weight_grad(wide, torch.randn(2, 128, 16, 16))
    with cpu_kernels.gemm_weight_grad(True):  # and the AVX512 rule's in fp32
        assert cpu_kernels.uses_gemm_weight_grad(small, torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize(
    ("native_bf16", "capability", "kind"),
    [
        (None, "AVX512", cpu_kernels.AVX512),
        (None, "AVX2", None),
        (cpu_kernels.AVX512_BF16, "AVX512", cpu_kernels.AVX512_BF16),
        (cpu_kernels.AMX, "AVX512", cpu_kernels.AMX),
    ],
)
def test_the_cpu_kind_comes_from_the_cpus_features(monkeypatch, native_bf16, capability, kind):
    monkeypatch.setattr(cpu_kernels, "x86_bf16_kind", lambda: native_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cpu_kernels.cpu_kind.cache_clear()
    try:
        assert cpu_kernels.cpu_kind() == kind
    finally:
        cpu_kernels.cpu_kind.cache_clear()  # this CPU's own kind, for the tests after


def test_the_forward_pass_is_torchs_own():
    torch.manual_seed(0)
    conv = cpu_kernels.Conv2d(8, 16, 3, stride=2, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(4, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        with cpu_kernels.gemm_weight_grad(True):
            chosen = conv(x)
        plain = F.conv2d(x, conv.weight, stride=2, padding=1)
    assert chosen.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(chosen, plain)
    assert chosen.grad_fn is not None and "ConvGemmWeightGrad" in type(chosen.grad_fn).__name__
    with cpu_kernels.gemm_weight_grad(True):
        chosen = conv(x)
    assert chosen.dtype == torch.float32 and "ConvGemmWeightGrad" in type(chosen.grad_fn).__name__
    assert torch.equal(chosen, F.conv2d(x, conv.weight, stride=2, padding=1))


def test_adopting_keeps_parameters_and_state_dict():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    names = dict(plain.state_dict())
    cpu_kernels.adopt(plain)
    assert all(type(m) is cpu_kernels.Conv2d for m in plain if isinstance(m, nn.Conv2d))
    assert plain.state_dict().keys() == names.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in names.items())


@pytest.mark.parametrize("backbone", ["smallcnn", "resnet18"])
def test_the_pooled_backbones_gradient_stays_channels_last(backbone):
    """A mixed-layout element-wise backward (NCHW gradient, channels-last activation) is 20x slower than a
    channels-last one; the gradient reaching the last block's output must be channels-last."""
    torch.manual_seed(0)
    model = build_backbone(backbone, 3, 32).to(memory_format=torch.channels_last)
    pool = model.pool if backbone == "smallcnn" else model.avgpool
    seen: list[torch.Tensor] = []
    pool.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_in[0]))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)
