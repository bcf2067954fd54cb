"""Training-step throughput of every method on the same backbone, batch and image size, in one run.

    python benchmarks/methods.py --backbone smallcnn --image-size 32 --channels 3 --batch-size 256

Each method uses its own defaults (`sslab methods`), so overheads such as momentum encoders, queues,
predictors and multi-crop show up. Rounds interleave the methods so that machine noise hits all of them alike;
throughput is also given relative to SimCLR.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslab.config import from_mapping
from sslab.methods import BUILTIN
from sslab.methods.base import Gather, StepContext, build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer
from sslab.runtime import tune_allocator
from sslab.train import plan_views


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--methods", default=",".join(BUILTIN))
    args = parser.parse_args()
    tune_allocator()

    images = torch.randint(0, 256, (args.batch_size, args.channels, args.image_size, args.image_size))
    images = images.to(torch.uint8)
    labels = torch.randint(0, 10, (args.batch_size,))
    steps = {}
    for name in args.methods.split(","):
        config = from_mapping({"method": name, "backbone": args.backbone, "batch_size": args.batch_size})
        torch.manual_seed(0)
        backbone = build_backbone(args.backbone, args.channels, args.image_size)
        memory_format = torch.channels_last if backbone.channels_last else torch.contiguous_format  # not ViTs
        method = build_method(config, backbone, num_classes=10).to(memory_format=memory_format)
        context = StepContext(  # CIFAR-10's training set sizes per-image state (InstDisc's memory bank)
            progress=0.5,
            progress_after=0.5,
            epochs_done=0.5,
            batch_indices=torch.arange(args.batch_size),
            num_images=50_000,
            gather=Gather(),
        )
        optimizer = build_optimizer(config, method, method.fixed_lr_parameters())
        views = plan_views(config, args.image_size)
        generator = torch.Generator().manual_seed(0)

        def step(
            method=method, optimizer=optimizer, views=views, generator=generator, context=context
        ) -> None:  # type: ignore[no-untyped-def]
            x = images.float().div_(255.0)
            layout = torch.channels_last if method.backbone.channels_last else torch.contiguous_format
            batch = [v.contiguous(memory_format=layout) for v in views(x, generator)]
            loss = method(batch, labels, context).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step(context)
            optimizer.step()
            method.after_step(context)

        method.train()
        step()  # warm-up
        steps[name] = step
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds[name].append((time.perf_counter() - start) / args.steps)
    print(
        f"backbone={args.backbone} batch={args.batch_size} "
        f"image={args.channels}x{args.image_size}x{args.image_size}"
        f" threads={torch.get_num_threads()} (median of {args.rounds} rounds)"
    )
    reference = statistics.median(seconds.get("simclr", next(iter(seconds.values()))))
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<11} {args.batch_size / median:8,.0f} images/s   {reference / median:5.2f}x SimCLR")


if __name__ == "__main__":
    main()
