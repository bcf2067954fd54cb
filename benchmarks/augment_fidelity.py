"""sslab's batched augmentation against per-image torchvision v2 transforms, everything else equal.

    SSLAB_DATA=../shared/data python benchmarks/augment_fidelity.py --seeds 0 1 2 --json fidelity.json
    python benchmarks/augment_fidelity.py --set dataset=synthetic --set train_subset=256 --set epochs=1 \\
        --set batch_size=64 --seeds 0                                                  # tiny

Each pipeline trains the same trial through sslab's trainer (same model init, data order, optimiser, schedule
and autocast); only the views differ:

- `sslab-1`: sslab's batched ops as pipeline version 1 had them (one colour-jitter order per batch, bilinear
  crops of fractional boxes), with its random streams;
- `sslab-2`: today's (an order per image, whole-pixel antialiased crops, derived streams);
- `torchvision`: per-image `torchvision.transforms.v2` ops on the uint8 images, as a standard pipeline makes
  them in its DataLoader workers (the loader itself changes no numbers and is left out).

Each is then probed with sslab's linear probe and kNN. Printed (and written with --json): test top-1 per
pipeline and seed with mean ± std over seeds, and, per op of the first view, statistics of its output on one
fixed batch under each pipeline (mean, std, mean absolute change from its input, mean per-image std), so that
an op that draws differently shows up on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_pipeline import peer_ops  # noqa: E402  (a sibling script, not a package)
from script_args import ArgumentParser  # noqa: E402

from sslab.augment.view import View, parse_view  # noqa: E402
from sslab.config import TrialConfig, from_mapping, parse_assignments  # noqa: E402
from sslab.errors import SslabError  # noqa: E402
from sslab.runner import build_model, evaluate, prepare_dataset  # noqa: E402
from sslab.train import SilentReporter, pretrain, resolve_device  # noqa: E402

PIPELINES = ("sslab-1", "sslab-2", "torchvision")
BASE = {"dataset": "cifar10", "train_subset": 20000, "epochs": 4, "batch_size": 256, "precision": "bf16"}
Views = Callable[[Tensor, torch.Generator], list[Tensor]]


def per_image(transforms: list[v2.Transform]) -> v2.Compose:
    return v2.Compose([*transforms, v2.ToDtype(torch.float32, scale=True)])


def torchvision_views(config: TrialConfig, image_size: int) -> Views:
    """Views of a batch of [0, 1] images made one image at a time by torchvision's ops on its uint8 pixels
    (they draw from torch's global generator, seeded with the trial's model)."""

    def ops(spec: str) -> list[v2.Transform]:
        return [op for step in parse_view(spec).steps for op in peer_ops(step, image_size)]

    base = v2.Compose(ops(config.base_aug)) if config.base_aug else None
    transforms = [per_image(ops(spec)) for spec in config.view_specs]

    def views(x: Tensor, generator: torch.Generator) -> list[Tensor]:
        images = list(x.mul(255).round_().to(torch.uint8).cpu())
        if base is not None:
            images = [base(image) for image in images]
        return [torch.stack([t(image) for image in images]).to(x.device) for t in transforms]

    return views


def train_and_probe(
    config: TrialConfig, pipeline: str, dataset: Any, device: torch.device
) -> dict[str, float]:
    """One pretraining with `pipeline`'s views, probed: test top-1 of the linear probe and kNN, seconds."""
    version = 1 if pipeline == "sslab-1" else 2
    config = config.replace(pipeline_version=version)
    method = build_model(config, dataset)
    views = torchvision_views(config, dataset.image_size) if pipeline == "torchvision" else None
    started = time.perf_counter()
    result = pretrain(
        method,
        config,
        dataset.train_images,
        dataset.train_labels,
        device,
        reporter=SilentReporter(),
        views=views,
    )
    metrics = evaluate(method, config, dataset, device)
    return {
        "linear_top1": 100 * metrics["linear_top1"],
        "knn_top1": 100 * metrics["knn_top1"],
        "final_loss": result.history[-1].loss,
        "seconds": time.perf_counter() - started,
    }


def op_statistics(config: TrialConfig, images: Tensor, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per op of the first view: its output's statistics on `images` (uint8) under each pipeline."""
    x = images.float() / 255
    size = images.shape[-1]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for step in parse_view(config.view_specs[0]).steps:
        outputs: dict[str, Tensor] = {}
        for version in (1, 2):
            outputs[f"sslab-{version}"] = View([step], version)(x, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        transform = per_image(peer_ops(step, size))
        outputs["torchvision"] = torch.stack([transform(image) for image in images])
        table[str(step)] = {name: _stats(out, x) for name, out in outputs.items()}
    return table


def _stats(out: Tensor, x: Tensor) -> dict[str, float]:
    change = (out - x).abs().mean().item() if out.shape == x.shape else float("nan")
    return {
        "mean": out.mean().item(),
        "std": out.std().item(),
        "change": change,
        "image_std": out.flatten(1).std(1).mean().item(),
    }


def summary(runs: dict[str, dict[int, dict[str, float]]], metric: str) -> dict[str, tuple[float, float]]:
    out = {}
    for pipeline, by_seed in runs.items():
        values = [r[metric] for r in by_seed.values()]
        out[pipeline] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="none: the op statistics only")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="trial field key=value")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stats-images", type=int, default=512, help="images of the op statistics batch")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = from_mapping({**BASE, **parse_assignments(args.sets), "device": args.device})
    device = resolve_device(config.device)
    dataset = prepare_dataset(config)
    print(
        f"{config.method} on {config.dataset} ({dataset.train_images.shape[0]} images), {config.epochs} "
        f"epochs of batch {config.batch_size}, {config.precision}, views {' | '.join(config.view_specs)}"
    )
    stats = op_statistics(config, dataset.train_images[: args.stats_images], seed=0)
    print(f"\n{'op (first view)':<42} {'pipeline':<12} {'mean':>7} {'std':>7} {'change':>7} {'img std':>7}")
    for op, by_pipeline in stats.items():
        for pipeline, s in by_pipeline.items():
            line = f"{s['mean']:7.4f} {s['std']:7.4f} {s['change']:7.4f} {s['image_std']:7.4f}"
            print(f"{op[:42]:<42} {pipeline:<12} {line}")

    runs: dict[str, dict[int, dict[str, float]]] = {p: {} for p in args.pipelines}
    print(f"\n{'pipeline':<12} {'seed':>4} {'linear':>7} {'kNN':>7} {'loss':>7} {'seconds':>8}")
    for seed in args.seeds:  # seeds outermost: machine noise hits every pipeline alike
        for pipeline in args.pipelines:
            run = train_and_probe(config.replace(seed=seed), pipeline, dataset, device)
            runs[pipeline][seed] = run
            print(
                f"{pipeline:<12} {seed:>4} {run['linear_top1']:7.2f} {run['knn_top1']:7.2f} "
                f"{run['final_loss']:7.4f} {run['seconds']:8.1f}",
                flush=True,
            )
    if args.seeds:
        print(f"\nmean ± std over seeds {args.seeds}:")
        linear, knn = summary(runs, "linear_top1"), summary(runs, "knn_top1")
        for pipeline in args.pipelines:
            (lm, ls), (km, ks) = linear[pipeline], knn[pipeline]
            print(f"{pipeline:<12} linear {lm:5.2f} ± {ls:4.2f}   kNN {km:5.2f} ± {ks:4.2f}")
    result = {"config": config.record(), "op_statistics": stats, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    try:
        main()
    except SslabError as exc:  # bad input: one line that says what to fix
        raise SystemExit(f"error: {exc}") from None
