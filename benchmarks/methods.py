"""Training-step throughput of every method on the same backbone, batch and image size, in one run.

    python benchmarks/methods.py --backbone smallcnn --image-size 32 --channels 3 --batch-size 256

Each method uses its own defaults (`sslab methods`), so overheads such as momentum encoders, queues,
predictors and multi-crop show up. The distillation methods (seed, distill) get a randomly initialised
`--teacher-backbone` SimCLR teacher kept in a temporary weights folder: its forward pass is their overhead.
Rounds interleave the methods so that machine noise hits all of them alike; throughput is also given relative
to SimCLR. `--precision bf16` runs the step under autocast, as the trainer does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from script_args import ArgumentParser

from sslab import weights
from sslab.config import TrialConfig, from_mapping
from sslab.methods import BUILTIN
from sslab.methods.base import Gather, StepContext, build_method
from sslab.models import backbone_for
from sslab.optim import build_optimizer
from sslab.runtime import tune_allocator
from sslab.train import autocast_dtype, plan_views

TEACHERS = ("seed", "distill")  # methods that need a kept teacher


def keep_random_teacher(backbone: str, channels: int, size: int, out_dim: int) -> str:
    """A randomly initialised SimCLR `backbone` kept as a finished trial's weights; its pretraining hash."""
    config = from_mapping({"method": "simclr", "backbone": backbone, "out_dim": out_dim})
    torch.manual_seed(1)
    teacher = build_method(config, backbone_for(config, channels, size), num_classes=10)
    weights.save(
        weights.TrainedWeights(
            pretraining_hash=config.pretraining_hash(),
            trial_hash=config.hash(),
            config=config.record(),
            state=teacher.state_dict(),
            channels=channels,
            image_size=size,
            num_classes=10,
            mean=torch.full((1, channels, 1, 1), 0.5),
            std=torch.full((1, channels, 1, 1), 0.25),
        )
    )
    return config.pretraining_hash()


def method_config(name: str, args: argparse.Namespace) -> TrialConfig:
    values = {"method": name, "backbone": args.backbone, "batch_size": args.batch_size}
    if name in TEACHERS:
        student_dim = from_mapping(values).out_dim
        values[f"{name}.teacher"] = keep_random_teacher(
            args.teacher_backbone, args.channels, args.image_size, student_dim
        )
    return from_mapping(values)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--methods", default=",".join(BUILTIN))
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--teacher-backbone", default="resnet18", help="of seed's and distill's teacher")
    args = parser.parse_args()
    tune_allocator()
    teachers = tempfile.TemporaryDirectory(prefix="sslab-teachers-")  # removed when the script ends
    os.environ[weights.WEIGHTS_ENV] = teachers.name
    amp = autocast_dtype(args.precision, torch.device("cpu"))

    images = torch.randint(0, 256, (args.batch_size, args.channels, args.image_size, args.image_size))
    images = images.to(torch.uint8)
    labels = torch.randint(0, 10, (args.batch_size,))
    steps = {}
    for name in args.methods.split(","):
        config = method_config(name, args)
        torch.manual_seed(0)
        backbone = backbone_for(config, args.channels, args.image_size)
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
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss = method(batch, labels, context).loss.float()
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
        f" precision={args.precision} threads={torch.get_num_threads()} (median of {args.rounds} rounds)"
    )
    reference = statistics.median(seconds.get("simclr", next(iter(seconds.values()))))
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<11} {args.batch_size / median:8,.0f} images/s   {reference / median:5.2f}x SimCLR")


if __name__ == "__main__":
    main()
