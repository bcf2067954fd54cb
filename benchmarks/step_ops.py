"""Where one training step's time goes, op by op, timed where each op runs in the step.

    .venv/bin/python benchmarks/step_ops.py --backbone smallcnn --batch-size 256 --precision bf16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_ops.py --aug "crop(scale=0.2-1),flip,color(s=0.5)"

The step is `benchmarks/throughput.py`'s (two views made from uint8 images on the device, forward under
autocast, backward, optimiser step). After warm-up steps, `--steps` steps run untimed per op to time the
phases (views, forward, backward, optimiser), then the same number again with every aten op timed by a
dispatch mode around it; prints each phase's milliseconds, then the `--top` costliest ops grouped by op and
the shape of their first tensor argument, as milliseconds per step and share of the timed ops.

Each op is timed in place, with the caches as the step leaves them. torch.profiler's self times measured up
to 5x more for some memory-bound ops of the small CNN's step (its first batch-norm backward: 48-70 ms in
the profiler, 9-15 ms here and in the step's own phase times), so this, not the profiler, is what tells
which op is worth a faster kernel. CPU only: on CUDA an op returns before its kernel ends.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from script_args import ArgumentParser  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from sslab.augment.view import parse_view  # noqa: E402
from sslab.config import from_mapping  # noqa: E402
from sslab.errors import SslabError  # noqa: E402
from sslab.methods.base import Gather, StepContext, build_method  # noqa: E402
from sslab.models import build_backbone  # noqa: E402
from sslab.optim import build_optimizer  # noqa: E402
from sslab.runtime import tune_allocator  # noqa: E402
from sslab.train import autocast_dtype  # noqa: E402

PHASES = ("views", "forward", "backward", "optimiser")


class OpTimer(TorchDispatchMode):
    """Adds each aten op's wall seconds to `seconds[(op name, shape of its first tensor argument)]`."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[tuple[str, tuple[int, ...]], float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        shape = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), ())
        self.seconds[(func.__name__, shape)] += elapsed
        return result


def build_step(args: argparse.Namespace) -> Callable[[dict[str, float]], None]:
    """The step, adding each phase's seconds to the dict it is given."""
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
    backbone = build_backbone(config.backbone, 3, args.image_size)
    method = build_method(config, backbone, num_classes=10).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, method)
    amp = autocast_dtype(config.precision, torch.device("cpu"))
    views = [parse_view(spec) for spec in config.view_specs]
    generator = torch.Generator().manual_seed(0)
    n = args.batch_size
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    context = StepContext(0.5, 0.5, 0.5, torch.arange(n), 50_000, Gather())
    method.train()

    def step(phases: dict[str, float]) -> None:
        marks = [time.perf_counter()]
        x = images.float().div_(255.0)
        batch = [view(x, generator).contiguous(memory_format=torch.channels_last) for view in views]
        marks.append(time.perf_counter())
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = method(batch, labels, context).loss.float()
        marks.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        method.before_optimizer_step(context)
        optimizer.step()
        method.after_step(context)
        marks.append(time.perf_counter())
        for phase, begin, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
            phases[phase] += end - begin

    return step


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--aug", default="crop(scale=0.2-1),flip,color(s=0.5)")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=6, help="steps timed by phase, then as many by op")
    parser.add_argument("--top", type=int, default=25, help="how many of the costliest ops to list")
    args = parser.parse_args()
    if args.steps < 1 or args.top < 1 or args.batch_size < 2:
        parser.error("--steps and --top must be at least 1, --batch-size at least 2")
    tune_allocator()
    try:
        step = build_step(args)
    except SslabError as error:
        parser.exit(2, f"error: {error}\n")
    warm: dict[str, float] = defaultdict(float)
    for _ in range(3):  # the allocator's heap and oneDNN's kernel choices settle
        step(warm)
    phases: dict[str, float] = defaultdict(float)
    for _ in range(args.steps):
        step(phases)
    timer = OpTimer()
    with timer:
        for _ in range(args.steps):
            step(defaultdict(float))
    print(
        f"backbone={args.backbone} method={args.method} batch={args.batch_size} precision={args.precision} "
        f"threads={torch.get_num_threads()} steps={args.steps}"
    )
    per_step = {phase: seconds / args.steps * 1e3 for phase, seconds in phases.items()}
    total = sum(per_step.values())
    print(f"step {total:.1f} ms: " + ", ".join(f"{p} {per_step[p]:.1f} ms" for p in PHASES))
    timed = sum(timer.seconds.values())
    print(f"ops timed one by one: {timed / args.steps * 1e3:.1f} ms per step")
    ranked = sorted(timer.seconds.items(), key=lambda item: -item[1])[: args.top]
    for (name, shape), seconds in ranked:
        print(f"{seconds / args.steps * 1e3:9.2f} ms {seconds / timed:6.1%}  {name} {list(shape)}")
    median = statistics.median(seconds for seconds in timer.seconds.values())
    print(f"{len(timer.seconds)} (op, shape) groups, median {median / args.steps * 1e3:.3f} ms per step")


if __name__ == "__main__":
    main()
