"""Each convolution's weight gradient by oneDNN against one matrix product (sslab/models/cpu_kernels.py), and
the training step with the matrix product forced off and on, in alternating rounds of one process.

    .venv/bin/python benchmarks/conv_weight_grad.py --backbone smallcnn --batch-size 256 --precision bf16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_weight_grad.py --backbone resnet18 --rounds 2
    .venv/bin/python benchmarks/conv_weight_grad.py --backbone smallcnn --precision fp32 --rounds 9

Prints, per convolution of the backbone (both views of `--batch-size` images), its output size, both weight
gradients' ms and GFLOP/s and which one the rule picks on this machine; then the step's images/s with torch's
kernel everywhere, with this CPU's rule, and (where that rule is not the widest one measured: AMX's in bf16,
AVX512's in fp32) with the widest rule's shapes forced on, each with its ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_peak import find_convolutions, pass_function, step_function, timed  # noqa: E402
from script_args import ArgumentParser  # noqa: E402

from sslab.errors import ConfigError  # noqa: E402
from sslab.models import cpu_kernels  # noqa: E402
from sslab.runtime import tune_allocator  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.batch_size < 1 or args.rounds < 1:
        raise SystemExit("error: --batch-size and --rounds must be >= 1")
    tune_allocator()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    overrides = {"method": args.method, "backbone": args.backbone, "batch_size": args.batch_size}
    try:
        step, method = step_function({**overrides, "precision": args.precision}, args.batch_size, 32)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    images = torch.randn(2 * args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    convs = find_convolutions(method.backbone, images, dtype)
    if not convs:
        raise SystemExit(f"error: backbone '{args.backbone}' has no 2-d convolutions to time")

    def by_gemm(conv):  # type: ignore[no-untyped-def]
        m = conv.module
        grad_out = torch.randn(conv.output_shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return lambda: cpu_kernels.conv_weight_grad(grad_out, conv.input, m.kernel_size, m.stride, m.padding)

    def step_with(enabled: bool | None):  # type: ignore[no-untyped-def]
        def run() -> None:
            with cpu_kernels.gemm_weight_grad(enabled):
                step()

        return run

    work = {}
    for i, conv in enumerate(convs):
        work[(i, "onednn")] = pass_function(conv, "weight_grad", dtype)
        work[(i, "gemm")] = by_gemm(conv)
    kind = cpu_kernels.cpu_kind()
    steps = {"torch's kernels": step_with(False), f"this CPU's rule ({kind or 'none'})": step_with(None)}
    widest_rule = cpu_kernels.AMX if dtype == torch.bfloat16 else cpu_kernels.AVX512
    if kind != widest_rule:
        steps[f"the {widest_rule} rule's shapes forced"] = step_with(True)
    for fn in [*work.values(), *steps.values()]:
        fn()  # warm-up: kernel selection, allocator
    seconds: dict = {key: [] for key in [*work, *steps]}
    for _ in range(args.rounds):
        for key, fn in work.items():
            seconds[key].append(timed(fn, 2))
        for key, fn in steps.items():
            seconds[key].append(timed(fn, 1))
    median = {key: statistics.median(values) for key, values in seconds.items()}

    print(
        f"backbone={args.backbone} batch={args.batch_size} precision={args.precision} "
        f"threads={torch.get_num_threads()} cpu={kind or 'none of the measured kinds'}"
    )
    print(
        f"{'convolution':<40} {'output':>7} {'oneDNN ms':>10} {'GFLOP/s':>8} {'GEMM ms':>8} "
        f"{'GFLOP/s':>8}  rule"
    )
    for i, conv in enumerate(convs):
        onednn, gemm = median[(i, "onednn")], median[(i, "gemm")]
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16), torch.enable_grad():
            picked = cpu_kernels.uses_gemm_weight_grad(conv.module, conv.input.float())
        print(
            f"{conv.label():<40} {conv.output_shape[-2]}x{conv.output_shape[-1]:<5} {onednn * 1e3:10.1f} "
            f"{conv.flops / onednn / 1e9:8.0f} {gemm * 1e3:8.1f} {conv.flops / gemm / 1e9:8.0f}  "
            f"{'GEMM' if picked else 'oneDNN'}"
        )
    base = median["torch's kernels"]
    for key in steps:
        print(
            f"training step, {key}: {args.batch_size / median[key]:,.1f} images/s ({base / median[key]:.2f}x)"
        )


if __name__ == "__main__":
    main()
