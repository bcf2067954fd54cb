"""Every convolution of a backbone's training step, timed alone: what the machine's convolutions reach, and
what share of that the whole step gets.

    .venv/bin/python benchmarks/conv_peak.py --backbone resnet18 --batch-size 256 --precision bf16

Finds the convolutions of one forward pass of `--backbone` (both views of `--batch-size` images, as a
two-view method's step sees them), then times each one's forward, input gradient and weight gradient
(`aten::convolution_backward` with one output asked for at a time), channels-last, in the step's precision,
in alternating rounds (median). Prints each convolution's GFLOP/s per pass, the fastest (the convolution peak
this machine reaches through torch's kernels), the convolutions' seconds and FLOPs per step, and a whole
training step's images/s and GFLOP/s (as `benchmarks/throughput.py` times it) as a share of that peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_pipeline import train_step  # noqa: E402  (a sibling script, not a package)
from script_args import ArgumentParser  # noqa: E402

from sslab.config import from_mapping  # noqa: E402
from sslab.errors import ConfigError  # noqa: E402
from sslab.methods.base import Gather, Method, StepContext, build_method  # noqa: E402
from sslab.models import build_backbone  # noqa: E402
from sslab.optim import build_optimizer  # noqa: E402
from sslab.runtime import tune_allocator  # noqa: E402
from sslab.train import autocast_dtype  # noqa: E402

PASSES = ("forward", "input_grad", "weight_grad")


@dataclass
class Conv:
    name: str
    module: nn.Conv2d
    input: torch.Tensor  # (N, C, H, W), channels-last, the step's compute dtype
    output_shape: torch.Size

    @property
    def flops(self) -> float:
        """Multiply-adds x 2 of the forward pass; each gradient costs as many (the first layer's input
        gradient is never needed in a step, but is timed like the others)."""
        n, out_c, out_h, out_w = self.output_shape
        in_per_group = self.module.in_channels // self.module.groups
        kh, kw = self.module.kernel_size
        return 2.0 * n * out_c * out_h * out_w * in_per_group * kh * kw

    def label(self) -> str:
        m = self.module
        return (
            f"{self.name} {m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} "
            f"{self.input.shape[-1]}px"
        )


def find_convolutions(backbone: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> list[Conv]:
    found: list[Conv] = []
    hooks = []
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):

            def record(
                mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name=name
            ) -> None:
                x = inputs[0].detach().to(dtype).contiguous(memory_format=torch.channels_last)
                found.append(Conv(name, mod, x, output.shape))  # type: ignore[arg-type]

            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        backbone(images)
    for hook in hooks:
        hook.remove()
    return found


def pass_function(conv: Conv, which: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    m = conv.module
    weight = m.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(conv.output_shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    common = (m.stride, m.padding, m.dilation, False, [0, 0], m.groups)
    if which == "forward":
        return lambda: torch.ops.aten.convolution(conv.input, weight, None, *common)
    mask = [which == "input_grad", which == "weight_grad", False]
    return lambda: torch.ops.aten.convolution_backward(grad_out, conv.input, weight, None, *common, mask)


def step_function(config_overrides: dict, batch: int, size: int):  # type: ignore[no-untyped-def]
    """The trainer's step (`peer_pipeline.train_step`) on fixed random views, and the method it trains."""
    config = from_mapping(config_overrides)
    torch.manual_seed(0)
    backbone = build_backbone(config.backbone, 3, size)
    method: Method = build_method(config, backbone, num_classes=10).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, method)
    amp = autocast_dtype(config.precision, torch.device("cpu"))
    views = [
        torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    labels = torch.zeros(batch, dtype=torch.long)
    context = StepContext(0.5, 0.5, 0.5, torch.arange(batch), 50_000, Gather())
    return (lambda: train_step(method, optimizer, views, labels, context, amp)), method


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.batch_size < 1 or args.rounds < 1 or args.image_size < 8:
        raise SystemExit("error: --batch-size and --rounds must be >= 1 and --image-size >= 8")
    tune_allocator()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    overrides = {
        "method": args.method,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "precision": args.precision,
    }
    try:
        step, method = step_function(overrides, args.batch_size, args.image_size)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    views = 2 * args.batch_size
    images = torch.randn(views, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last
    )
    convs = find_convolutions(method.backbone, images, dtype)
    if not convs:
        raise SystemExit(f"error: backbone '{args.backbone}' has no 2-d convolutions to time")
    work = {(i, which): pass_function(conv, which, dtype) for i, conv in enumerate(convs) for which in PASSES}
    for fn in work.values():  # warm-up: oneDNN picks and JIT-compiles its kernels
        fn()
    step()
    seconds: dict[tuple[int, str], list[float]] = {key: [] for key in work}
    step_seconds: list[float] = []
    for _ in range(args.rounds):
        for key, fn in work.items():
            seconds[key].append(timed(fn, 2))
        step_seconds.append(timed(step, 1))

    median = {key: statistics.median(times) for key, times in seconds.items()}
    print(
        f"backbone={args.backbone} batch={args.batch_size} views={views} image={args.image_size}px "
        f"precision={args.precision} threads={torch.get_num_threads()}"
    )
    print(f"{'convolution':<40} {'GFLOP':>7} " + " ".join(f"{p + ' GFLOP/s':>20}" for p in PASSES))
    for i, conv in enumerate(convs):
        rates = " ".join(f"{conv.flops / median[(i, p)] / 1e9:20.0f}" for p in PASSES)
        print(f"{conv.label():<40} {conv.flops / 1e9:7.2f} {rates}")
    peak = max(convs[i].flops / s for (i, _), s in median.items())
    needed = [(i, p) for i, _ in enumerate(convs) for p in PASSES if not (i == 0 and p == "input_grad")]
    conv_flops = sum(convs[i].flops for i, _ in needed)
    conv_s = sum(median[key] for key in needed)
    step_s = statistics.median(step_seconds)
    print(f"fastest convolution pass: {peak / 1e9:,.0f} GFLOP/s (the convolution peak reached here)")
    print(
        f"the step's convolutions alone: {conv_s * 1e3:,.0f} ms, {conv_flops / 1e9:,.1f} GFLOP, "
        f"{conv_flops / conv_s / 1e9:,.0f} GFLOP/s ({conv_flops / conv_s / peak:.0%} of that peak)"
    )
    print(
        f"training step: {args.batch_size / step_s:,.1f} images/s ({views / step_s:,.1f} views/s), "
        f"{conv_flops / step_s / 1e9:,.0f} GFLOP/s of convolutions, {conv_flops / step_s / peak:.0%} of that "
        f"peak; convolutions {conv_s / step_s:.0%} of the step's time"
    )


if __name__ == "__main__":
    main()
