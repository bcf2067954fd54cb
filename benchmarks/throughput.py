"""Augmentation vs training-step throughput for one backbone, batch and image size, measured in one run.

    python benchmarks/throughput.py --backbone smallcnn --image-size 32 --channels 3 --batch-size 256
    python benchmarks/throughput.py --backbone resnet18 --image-size 32 --channels 3 --batch-size 256

Prints images/s for the two-view augmentation alone, for a full training step (augmentation included),
and the share of the step spent augmenting. Timings alternate between the two so that machine noise hits
both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from script_args import ArgumentParser

from sslab.augment.view import parse_view
from sslab.config import from_mapping
from sslab.methods.base import Gather, StepContext, build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer
from sslab.runtime import tune_allocator
from sslab.train import autocast_dtype, resolve_device


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--aug", default="crop,flip,color,grayscale,blur")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median is reported)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--tune-malloc", action=argparse.BooleanOptionalAction, default=True, help="as the sslab command does"
    )
    args = parser.parse_args()
    if args.tune_malloc:
        tune_allocator()

    device = resolve_device(args.device)
    config = from_mapping(
        {
            "method": args.method,
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "aug": args.aug,
            "precision": args.precision,
        }
    )
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, args.channels, args.image_size)
    method = build_method(config, backbone, num_classes=10).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    method.to(memory_format=memory_format)
    optimizer = build_optimizer(config, method)
    amp = autocast_dtype(args.precision, device)
    views = [parse_view(spec) for spec in config.view_specs]
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(
        0, 256, (args.batch_size, args.channels, args.image_size, args.image_size), dtype=torch.uint8
    )
    images = images.to(device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    context = StepContext(0.5, 0.5, 0.5, torch.arange(args.batch_size, device=device), 50_000, Gather())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def augment() -> list[torch.Tensor]:
        x = images.float().div_(255.0)
        return [view(x, generator).contiguous(memory_format=memory_format) for view in views]

    def train_step() -> None:
        batch = augment()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = method(batch, labels, context).loss
        optimizer.zero_grad(set_to_none=True)
        loss.float().backward()
        optimizer.step()
        method.after_step(context)

    def timed(fn, rounds: int) -> float:  # type: ignore[no-untyped-def]
        sync()
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        sync()
        return (time.perf_counter() - start) / rounds

    method.train()
    for _ in range(2):  # warm-up: allocator, oneDNN/cuDNN kernel selection
        train_step()
    augment_times, step_times = [], []
    for _ in range(args.repeats):
        augment_times.append(timed(augment, 5))
        step_times.append(timed(train_step, 3))
    augment_s, step_s = statistics.median(augment_times), statistics.median(step_times)
    n = args.batch_size
    print(
        f"device={device} backbone={args.backbone} method={args.method} batch={n} "
        f"image={args.channels}x{args.image_size}x{args.image_size} precision={args.precision} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"augmentation (2 views): {n / augment_s:10,.0f} images/s  ({augment_s * 1e3:.1f} ms/batch)")
    print(f"training step (incl. aug): {n / step_s:10,.0f} images/s  ({step_s * 1e3:.1f} ms/batch)")
    print(f"augmentation share of step time: {augment_s / step_s:.1%}")


if __name__ == "__main__":
    main()
