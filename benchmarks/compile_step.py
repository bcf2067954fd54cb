"""The training step with a compiled backbone (`--compile`, torch.compile) against the eager one, in one run.

    .venv/bin/python benchmarks/compile_step.py --backbone smallcnn --batch-size 256 --precision fp32
    .venv/bin/python benchmarks/compile_step.py --backbone resnet18 --batch-size 512 --precision bf16 \
        --device cuda

Two copies of one method from the same seed, one with `backbone.compile()` as the trainer does under
`--compile`; the seconds the first two compiled steps take (compiling included), then rounds that alternate
the two, the median of each reported as images/s with their ratio. The step is the trainer's: two views made
on the device, forward under autocast, backward, optimiser step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from script_args import ArgumentParser  # noqa: E402

from sslab.augment.view import parse_view  # noqa: E402
from sslab.config import from_mapping  # noqa: E402
from sslab.errors import SslabError  # noqa: E402
from sslab.methods.base import Gather, StepContext, build_method  # noqa: E402
from sslab.models import build_backbone  # noqa: E402
from sslab.optim import build_optimizer  # noqa: E402
from sslab.runtime import tune_allocator  # noqa: E402
from sslab.train import autocast_dtype, resolve_device  # noqa: E402


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    args = parser.parse_args()
    try:
        run(args)
    except SslabError as exc:
        raise SystemExit(f"error: {exc}") from None


def run(args: argparse.Namespace) -> None:
    tune_allocator()
    device = resolve_device(args.device)
    values = {"method": args.method, "backbone": args.backbone, "batch_size": args.batch_size}
    config = from_mapping({**values, "precision": args.precision})
    amp = autocast_dtype(config.precision, device)
    views = [parse_view(spec) for spec in config.view_specs]
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    context = StepContext(0.5, 0.5, 0.5, torch.arange(args.batch_size, device=device), 50_000, Gather())

    def make(compiled: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        method = build_method(config, build_backbone(args.backbone, 3, args.image_size), num_classes=10)
        method.to(device).to(memory_format=torch.channels_last).train()
        if compiled:
            method.backbone.compile()
        return method, build_optimizer(config, method)

    def step(method: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        x = images.float().div_(255.0)
        batch = [view(x, generator).contiguous(memory_format=torch.channels_last) for view in views]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = method(batch, labels, context).loss
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    candidates = {"eager": make(False), "compiled": make(True)}
    start = time.perf_counter()
    for _ in range(2):
        step(*candidates["compiled"])
    sync()
    compile_s = time.perf_counter() - start
    for _ in range(2):
        step(*candidates["eager"])
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, candidate in candidates.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(*candidate)
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    rates = {name: args.batch_size / statistics.median(seconds) for name, seconds in times.items()}
    precision = "fp32" if amp is None else str(amp).removeprefix("torch.")
    print(
        f"device={device} backbone={args.backbone} method={args.method} batch={args.batch_size} "
        f"image=3x{args.image_size}x{args.image_size} precision={precision} threads={torch.get_num_threads()}"
    )
    print(f"first two compiled steps (compiling included): {compile_s:.1f} s")
    for name, rate in rates.items():
        print(f"{name:<9} {rate:10,.0f} images/s")
    print(f"ratio compiled / eager: {rates['compiled'] / rates['eager']:.2f}x")


if __name__ == "__main__":
    main()
