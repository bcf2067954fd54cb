"""The random-init baseline with batch-norm at its initial running statistics, against the same network with
them recalibrated on the training images (what the baseline would be if BN had seen the data).

    SSLAB_DATA=../shared/data python benchmarks/baseline_bn.py --backbones smallcnn resnet18 --seeds 0 1
    python benchmarks/baseline_bn.py --set dataset=synthetic --set train_subset=256 --seeds 0   # tiny

sslab's baseline (`runner.evaluate` on the freshly built method) uses the initial statistics (mean 0,
variance 1): the network a pretraining starts from, as it is. Recalibrating runs the training images through
it in train mode without gradients, with a cumulative average (`momentum=None`), then probes the same way.
Printed: linear-probe and kNN test top-1 % of both, per backbone and seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from script_args import ArgumentParser
from torch import nn

from sslab.config import from_mapping, parse_assignments
from sslab.errors import SslabError
from sslab.methods.base import Method
from sslab.runner import build_model, evaluate, prepare_dataset
from sslab.train import channel_stats, resolve_device

BASE = {"dataset": "cifar10", "train_subset": 20000}


@torch.no_grad()
def recalibrate_batch_norm(
    method: Method, images: torch.Tensor, device: torch.device, batch: int = 512
) -> int:
    """Set every batch-norm layer's running statistics to their average over `images` (uint8); returns the
    number of layers recalibrated. The backbone is left in eval mode."""
    norms = [m for m in method.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    mean, std = (t.to(device) for t in channel_stats(images))
    method.backbone.train()
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch].to(device).float().div_(255)
        method.backbone((x - mean) / std)
    method.backbone.eval()
    return len(norms)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["smallcnn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="trial field key=value")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    print(f"{'backbone':<10} {'seed':>4} {'BN statistics':<14} {'linear':>7} {'kNN':>7}")
    for backbone in args.backbones:
        config = from_mapping({**BASE, "backbone": backbone, **parse_assignments(args.sets)})
        device = resolve_device(config.device)
        dataset = prepare_dataset(config)
        for seed in args.seeds:
            seeded = config.replace(seed=seed)
            for statistics in ("initial", "recalibrated"):
                method = build_model(seeded, dataset).to(device)
                if statistics == "recalibrated":
                    recalibrate_batch_norm(method, dataset.train_images, device)
                method.eval()
                metrics = evaluate(method, seeded, dataset, device)
                row = {
                    "backbone": backbone,
                    "seed": seed,
                    "bn": statistics,
                    "linear_top1": 100 * metrics["linear_top1"],
                    "knn_top1": 100 * metrics["knn_top1"],
                }
                rows.append(row)
                accuracy = f"{row['linear_top1']:7.2f} {row['knn_top1']:7.2f}"
                print(f"{backbone:<10} {seed:>4} {statistics:<14} {accuracy}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    try:
        main()
    except SslabError as exc:  # bad input: one line that says what to fix
        raise SystemExit(f"error: {exc}") from None
