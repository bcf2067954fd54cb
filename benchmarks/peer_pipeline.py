"""sslab's training step against the per-image pipeline peer libraries use, at equal model, loss and data.

    python benchmarks/peer_pipeline.py --dataset cifar10 --backbone resnet18 --batch-size 512 \\
        --precision bf16 --device cuda --json peer.json
    python benchmarks/peer_pipeline.py --dataset synthetic --backbone smallcnn --batch-size 32 \\
        --device cpu --workers 1 --steps 3 --rounds 2

The peer pipeline is the usual one: a torch Dataset of uint8 images whose __getitem__ makes two views with
per-image torchvision.transforms.v2 ops (translated from the same view spec as sslab's, with sslab's
parameters), a DataLoader with worker processes, pinned memory and persistent workers, then the batch
copied to the device. sslab's step gathers the batch from images held on the device and augments it there
in one batched pass (sslab/train.py). Both train the same model (same seed), method, optimiser and
autocast with the same step, and rounds alternate between them so that machine noise hits both alike.

Printed (and written with --json): images/s of each pipeline (median over rounds), the ratio sslab / peer,
the share of sslab's step spent on its data side (gather, two views, normalise), and on CUDA the peak GPU
memory of each and the fraction of the GPU's peak reached (conv/matmul FLOPs per image counted by
torch.utils.flop_counter over one forward and backward, times images/s, over --peak-tflops).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from script_args import ArgumentParser
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from sslab.augment.signatures import Value
from sslab.augment.spec import Step
from sslab.augment.view import parse_view
from sslab.config import TrialConfig, from_mapping
from sslab.data import load_dataset
from sslab.methods.base import Gather, Method, StepContext, build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer
from sslab.runtime import tune_allocator
from sslab.train import autocast_dtype, channel_stats, plan_views, resolve_device

H200_BF16_TFLOPS = 989.0  # NVIDIA's datasheet: H100/H200 SXM dense bf16 (without sparsity)
MIRRORED_OPS = ("crop", "flip", "jitter", "color", "grayscale", "blur", "solarize", "identity")

Batch = tuple[Tensor, Tensor, int, int]  # view 1, view 2 (C, H, W) float, label, index


def blur_kernel_side(fraction: float, side: int) -> int:
    """The odd kernel side of sslab's blur: closest to fraction * side, at least 3, at most 2 side - 1."""
    return min(max(3, 2 * int(fraction * side / 2) + 1), 2 * side - 1)


def number(value: Value) -> float:
    """A scalar op parameter (the others are ranges and booleans)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def peer_ops(step: Step, image_size: int) -> list[v2.Transform]:
    """The per-image torchvision ops for one step of an sslab view, with the step's parameters."""
    name, p = step.op.name, step.params
    if name == "crop":
        size = int(number(p["size"])) or image_size
        return [v2.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"], antialias=True)]
    if name == "flip":
        return [v2.RandomHorizontalFlip(p["p"])]
    if name == "jitter":
        jitter = v2.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])
        return [v2.RandomApply([jitter], p=p["p"])]
    if name == "color":  # SimCLR's colour distortion: jitter(0.8s, 0.8s, 0.8s, 0.2s), then grayscale
        a, h = 0.8 * number(p["s"]), 0.2 * number(p["s"])
        return [v2.RandomApply([v2.ColorJitter(a, a, a, h)], p=p["p"]), v2.RandomGrayscale(p["gray"])]
    if name == "grayscale":
        return [v2.RandomGrayscale(p["p"])]
    if name == "blur":
        blur = v2.GaussianBlur(blur_kernel_side(number(p["kernel"]), image_size), sigma=p["sigma"])
        return [v2.RandomApply([blur], p=p["p"])]
    if name == "solarize":  # the ops see uint8 images, sslab's threshold is in [0, 1] units
        return [v2.RandomSolarize(number(p["threshold"]) * 255, p["p"])]
    if name == "identity":
        return []
    raise ValueError(
        f"op {name!r} has no per-image torchvision counterpart here; use {', '.join(MIRRORED_OPS)}"
    )


def peer_transform(spec: str, image_size: int, mean: Tensor, std: Tensor) -> v2.Compose:
    """uint8 (C, H, W) -> normalised float view, op for op as sslab's view `spec`, one image at a time."""
    ops = [op for step in parse_view(spec).steps for op in peer_ops(step, image_size)]
    to_float = v2.ToDtype(torch.float32, scale=True)
    return v2.Compose([*ops, to_float, v2.Normalize(mean.flatten().tolist(), std.flatten().tolist())])


class TwoViewDataset(Dataset[Batch]):
    """Two views of each uint8 image (N, C, H, W), each made by its own per-image transform.

    The transforms draw from torch's global RNG, which DataLoader seeds in every worker.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transforms: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]],
    ) -> None:
        self.images, self.labels, self.transforms = images, labels, transforms

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Batch:
        image = self.images[index]  # (C, H, W) uint8
        first, second = self.transforms
        return first(image), second(image), int(self.labels[index]), index


def two_view_dataset(config: TrialConfig, images: Tensor, labels: Tensor) -> TwoViewDataset:
    """The peer dataset for `config`'s two view specs, normalised with the images' channel statistics."""
    mean, std = channel_stats(images)
    size = images.shape[-1]
    first, second = (peer_transform(spec, size, mean, std) for spec in config.view_specs)
    return TwoViewDataset(images, labels, (first, second))


def train_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    views: list[Tensor],
    labels: Tensor,
    context: StepContext,
    amp: torch.dtype | None,
) -> None:
    """One optimiser step as sslab/train.py takes it (the finiteness check syncs with the host each step)."""
    with torch.autocast(views[0].device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = method(views, labels, context).loss.float()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step(context)
    optimizer.step()
    method.after_step(context)


def flops_per_image(
    method: Method, views: list[Tensor], labels: Tensor, context: StepContext, amp: torch.dtype | None
) -> float:
    """Conv and matmul FLOPs of one forward and backward, per source image, on a copy of `method`."""
    model = copy.deepcopy(method)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(views[0].device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(views, labels, context).loss.float()
        loss.backward()
    return counter.get_total_flops() / views[0].shape[0]


def median_rate(images: int, seconds: list[float]) -> float:
    return images / statistics.median(seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--method", default="simclr", help="a two-view method (no local crops)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="DataLoader worker processes of the peer pipeline [default: all cores but one, its best case]",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pipeline per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    parser.add_argument("--dataset", default="cifar10", help="a dataset name of `sslab data list`")
    parser.add_argument("--data-dir", default=None, help="where to look for the dataset first")
    parser.add_argument(
        "--aug",
        default=None,
        help=f"view spec of both views [default: sslab's, {TrialConfig.aug}]; ops: {', '.join(MIRRORED_OPS)}",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_TFLOPS,
        help="the GPU's peak for the fraction reached [default: 989, an H200's dense bf16 peak]",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.steps, args.rounds) < 1 or args.workers < 0:
        parser.error("--batch-size, --steps and --rounds must be positive, --workers at least 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tune_allocator()  # as the sslab command does; process-wide, so the peer's main process gets it too
    device = resolve_device(args.device)
    fields = {"method": args.method, "backbone": args.backbone, "batch_size": args.batch_size}
    config = from_mapping({**fields, "precision": args.precision, **({"aug": args.aug} if args.aug else {})})
    if config.local_crops:
        raise SystemExit(f"{args.method} uses local crops; the peer pipeline makes two views only")
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    images, labels = data.train_images, data.train_labels  # (N, C, H, W) uint8, (N,)
    n, batch = images.shape[0], args.batch_size
    if n < batch:
        raise SystemExit(f"{args.dataset} has {n} training images, fewer than one batch of {batch}")
    amp = autocast_dtype(args.precision, device)
    cuda = device.type == "cuda"

    def build() -> tuple[Method, torch.optim.Optimizer]:
        torch.manual_seed(args.seed)  # both pipelines start from the same weights
        backbone = build_backbone(
            config.backbone,
            data.channels,
            data.image_size,
            config.cifar_stem,
            patch_size=config.patch_size,
            vit_pool=config.vit_pool,
            resnet_width=config.resnet_width,
        )
        method = build_method(config, backbone, data.num_classes).to(device)
        if method.backbone.channels_last:
            method.to(memory_format=torch.channels_last)
        method.train()
        return method, build_optimizer(config, method, method.fixed_lr_parameters())

    mean, std = (t.to(device) for t in channel_stats(images))  # (1, C, 1, 1): both normalise with these

    def context(indices: Tensor) -> StepContext:
        return StepContext(0.5, 0.5, 0.5, indices, n, Gather(), mean=mean, std=std)

    # sslab: the images live on the device; each step gathers a batch and augments it there (sslab/train.py)
    ours, ours_optimizer = build()
    memory_format = torch.channels_last if ours.backbone.channels_last else torch.contiguous_format
    plan = plan_views(config, data.image_size)
    device_images, device_labels = images.to(device), labels.to(device)
    augment_rng = torch.Generator(device=device).manual_seed(args.seed + 1)
    sampler = torch.Generator().manual_seed(args.seed)
    order, position = torch.randperm(n, generator=sampler), 0

    def ours_batch() -> tuple[list[Tensor], Tensor, StepContext]:
        nonlocal order, position
        if position + batch > n:  # next epoch
            order, position = torch.randperm(n, generator=sampler), 0
        index = order[position : position + batch].to(device)
        position += batch
        x = device_images[index].float().div_(255.0)  # (B, C, H, W)
        views = [((v - mean) / std).contiguous(memory_format=memory_format) for v in plan(x, augment_rng)]
        return views, device_labels[index], context(index)

    def ours_step() -> None:
        views, batch_labels, step_context = ours_batch()
        train_step(ours, ours_optimizer, views, batch_labels, step_context, amp)

    # the peer: per-image views in DataLoader workers, copied to the device batch by batch
    theirs, theirs_optimizer = build()
    loader = DataLoader(
        two_view_dataset(config, images, labels),
        batch_size=batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=cuda,
        persistent_workers=args.workers > 0,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )

    def peer_batches() -> Iterator[tuple[list[Tensor], Tensor, StepContext]]:
        """Batches from a fresh pass over the loader, going on into the next epoch when one ends.

        Each round starts a fresh pass so that batches the workers prefetched while sslab's round ran
        are dropped, not served for free: the round pays the pipeline's start, as an epoch does.
        """
        while True:
            for first, second, batch_labels, index in loader:
                views = [
                    v.to(device, non_blocking=cuda).contiguous(memory_format=memory_format)
                    for v in (first, second)
                ]
                index = index.to(device, non_blocking=cuda)
                yield views, batch_labels.to(device, non_blocking=cuda), context(index)

    def peer_steps(steps: int) -> None:
        batches = peer_batches()
        for _ in range(steps):
            views, batch_labels, step_context = next(batches)
            train_step(theirs, theirs_optimizer, views, batch_labels, step_context, amp)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(run: Callable[[], None], memory: list[int]) -> float:
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run()
        sync()
        seconds = time.perf_counter() - start
        if cuda:
            memory.append(torch.cuda.max_memory_allocated(device))
        return seconds / args.steps

    def repeat(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.steps):
                fn()

        return run

    for _ in range(2):  # warm-up: allocator, kernel selection, the workers' start
        ours_step()
    peer_steps(2)
    views, batch_labels, step_context = ours_batch()
    flops = flops_per_image(ours, views, batch_labels, step_context, amp)

    seconds: dict[str, list[float]] = {"augment": [], "sslab": [], "peer": []}
    memory: dict[str, list[int]] = {"augment": [], "sslab": [], "peer": []}
    runs: dict[str, Callable[[], None]] = {
        "augment": repeat(ours_batch),
        "sslab": repeat(ours_step),
        "peer": lambda: peer_steps(args.steps),
    }
    for round_ in range(args.rounds):
        names = ["augment", "sslab", "peer"] if round_ % 2 == 0 else ["peer", "augment", "sslab"]
        for name in names:
            seconds[name].append(timed(runs[name], memory[name]))

    def pipeline(name: str) -> dict[str, Any]:
        rate = median_rate(batch, seconds[name])
        return {
            "images_per_s": rate,
            "seconds_per_step": statistics.median(seconds[name]),
            "round_images_per_s": [batch / s for s in seconds[name]],
            "peak_memory_bytes": max(memory[name]) if cuda else None,
            "peak_fraction": flops * rate / (args.peak_tflops * 1e12) if cuda else None,
        }

    sslab, peer = pipeline("sslab"), pipeline("peer")
    augment_s = statistics.median(seconds["augment"])
    sslab["augment_images_per_s"] = batch / augment_s
    sslab["augment_share"] = augment_s / sslab["seconds_per_step"]
    result = {
        "config": {
            "method": args.method,
            "backbone": args.backbone,
            "batch_size": batch,
            "precision": args.precision,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "dataset": data.name,
            "image": [data.channels, data.image_size, data.image_size],
            "views": list(config.view_specs),
            "workers": args.workers,
            "steps": args.steps,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "peak_tflops": args.peak_tflops,
        },
        "sslab": sslab,
        "peer": peer,
        "ratio": sslab["images_per_s"] / peer["images_per_s"],  # sslab / peer: > 1 means sslab is faster
        "flops_per_image": flops,
    }
    report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(result: dict[str, Any]) -> None:
    c, sslab, peer = result["config"], result["sslab"], result["peer"]
    print(
        f"device={c['device']}{' (' + c['gpu'] + ')' if c['gpu'] else ''} dataset={c['dataset']} "
        f"image={'x'.join(map(str, c['image']))} method={c['method']} backbone={c['backbone']} "
        f"batch={c['batch_size']} precision={c['precision']} workers={c['workers']} threads={c['threads']} "
        f"(median of {c['rounds']} rounds of {c['steps']} steps)"
    )
    for name, numbers in (("sslab (on-device views)", sslab), ("peer (per-image DataLoader)", peer)):
        line = f"{name:<28} {numbers['images_per_s']:10,.0f} images/s"
        if numbers["peak_memory_bytes"] is not None:
            line += f"  peak memory {numbers['peak_memory_bytes'] / 2**30:6.2f} GiB"
            line += f"  {numbers['peak_fraction']:6.1%} of {c['peak_tflops']:g} TFLOP/s"
        print(line)
    print(f"ratio sslab / peer: {result['ratio']:.2f}x")
    print(
        f"sslab data side (gather, 2 views, normalise): {sslab['augment_images_per_s']:10,.0f} images/s, "
        f"{sslab['augment_share']:.1%} of its step"
    )
    print(f"model FLOPs per image (forward + backward, both views): {result['flops_per_image'] / 1e9:.3f} G")


if __name__ == "__main__":
    main()
