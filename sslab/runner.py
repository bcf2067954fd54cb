"""Run one trial end to end: data -> random-init baseline -> pretraining -> evaluation -> results store."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import sslab
from sslab import distributed
from sslab.config import TrialConfig
from sslab.data import ImageDataset, load_dataset
from sslab.errors import SslabError
from sslab.evaluate import extract_features, knn_top1, knn_val_top1, linear_probe
from sslab.methods.base import Method, build_method
from sslab.metrics import (
    BASELINE_PREFIX,
    COLLAPSE_RATIO,
    FINAL_LOSS,
    IMAGES_PER_S,
    KNN_TOP1,
    KNN_VAL_TOP1,
    LINEAR_TOP1,
    LINEAR_VAL_TOP1,
    PROBE_WEIGHT_DECAY,
    TRAIN_SECONDS,
    layer_name,
)
from sslab.models import build_backbone
from sslab.store import Provenance, Store
from sslab.tracking import open_trackers
from sslab.train import EpochRecord, Reporter, TrainResult, channel_stats, pretrain, resolve_device

DEFAULT_CHECKPOINT_DIR = Path("results/checkpoints")


@dataclass
class TrialOutcome:
    trial_id: int
    config_hash: str
    status: str  # done | failed | cached
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    collapsed: bool | None = None
    wall_time_s: float | None = None


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(device: torch.device) -> Provenance:
    name = str(device)
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    return Provenance(
        name, torch.__version__, sslab.__version__, git_commit(), platform.node(), torch.get_num_threads()
    )


def balanced_subset(images: Tensor, labels: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The first `count` images taken round-robin over classes, so every class keeps its share."""
    if count >= labels.numel():
        return images, labels
    rank_in_class = torch.zeros_like(labels)
    for cls in labels.unique():
        members = labels == cls
        rank_in_class[members] = torch.arange(int(members.sum()))
    order = torch.argsort(rank_in_class * (int(labels.max()) + 1) + labels, stable=True)[:count]
    order = order.sort().values
    return images[order], labels[order]


def prepare_dataset(config: TrialConfig) -> ImageDataset:
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, image_size=config.image_size)
    if config.train_subset is not None:
        images, labels = balanced_subset(dataset.train_images, dataset.train_labels, config.train_subset)
        dataset = ImageDataset(
            dataset.name, images, labels, dataset.test_images, dataset.test_labels, dataset.classes
        )
    return dataset


def build_model(config: TrialConfig, dataset: ImageDataset) -> Method:
    torch.manual_seed(config.seed)
    backbone = build_backbone(config.backbone, dataset.channels, dataset.image_size, config.cifar_stem)
    return build_method(config, backbone, dataset.num_classes)


def evaluate(
    method: Method, config: TrialConfig, dataset: ImageDataset, device: torch.device
) -> dict[str, float]:
    """Linear-probe and kNN test top-1 on frozen features at h (and every head layer if asked)."""
    mean, std = channel_stats(dataset.train_images)
    all_layers = config.probe_layers == "all"
    train = extract_features(method, dataset.train_images, mean, std, device, all_layers)
    test = extract_features(method, dataset.test_images, mean, std, device, all_layers)
    metrics: dict[str, float] = {}
    for layer in train:
        probe = linear_probe(
            train[layer],
            dataset.train_labels,
            test[layer],
            dataset.test_labels,
            dataset.num_classes,
            config.val_fraction,
        )
        metrics[layer_name(LINEAR_TOP1, layer)] = probe.top1
        if probe.val_top1 is not None:
            metrics[layer_name(LINEAR_VAL_TOP1, layer)] = probe.val_top1
            metrics[layer_name(PROBE_WEIGHT_DECAY, layer)] = probe.weight_decay
        metrics[layer_name(KNN_TOP1, layer)] = knn_top1(
            train[layer],
            dataset.train_labels,
            test[layer],
            dataset.test_labels,
            dataset.num_classes,
            config.knn_k,
            config.knn_t,
        )
        if config.val_fraction > 0:
            metrics[layer_name(KNN_VAL_TOP1, layer)] = knn_val_top1(
                train[layer],
                dataset.train_labels,
                dataset.num_classes,
                config.val_fraction,
                config.knn_k,
                config.knn_t,
            )
    deepest = max((int(layer[1:]) for layer in train if layer != "h"), default=0)
    if deepest:  # z = g(h), the head's output, whatever its depth (SimCLR Fig. 8 probes h against z)
        for metric in (LINEAR_TOP1, KNN_TOP1):
            metrics[layer_name(metric, "z")] = metrics[layer_name(metric, f"g{deepest}")]
    return metrics


def run_trial(
    config: TrialConfig,
    store: Store,
    *,
    force: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    dataset: ImageDataset | None = None,
    epoch_hook: Callable[[Method, EpochRecord, dict[str, float]], None] | None = None,
    baseline_cache: dict[tuple[Any, ...], dict[str, float]] | None = None,
    log: Sequence[str] = (),
) -> TrialOutcome:
    """Pretrain and evaluate `config`, recording everything in `store`.

    `epoch_hook` runs after each trained epoch; the metrics it puts in its dict are recorded with the epoch,
    and it may raise to stop the trial (pruning). `baseline_cache` reuses the random-init baseline across
    trials that share its `baseline_key`. `log` names trackers (`tensorboard`, `wandb`) that also get the
    per-epoch and final metrics.

    A config whose hash is already `done` in the store is not trained again unless `force`. With `resume`,
    training continues from the trial's last per-epoch checkpoint. Failures are recorded with their reason;
    an interruption (Ctrl-C) is recorded as `interrupted` and re-raised.
    Under torchrun every process trains its share of each batch; the main process alone evaluates and
    records the trial, the others wait for its record and return it.
    """
    existing = store.find(config.hash())
    if existing is not None and existing.status == "done" and not force:
        return TrialOutcome(
            existing.id,
            existing.config_hash,
            "cached",
            store.final_metrics(existing.id),
            collapsed=existing.collapsed,
            wall_time_s=existing.wall_time_s,
        )
    device = distributed.init(resolve_device(config.device))  # this process's device under torchrun
    distributed.check_method(config.info)
    distributed.local_batch_size(config.batch_size)  # the global batch must split over the processes
    dataset = dataset if dataset is not None else prepare_dataset(config)
    checkpoint = checkpoint_dir / f"{config.hash()}.pt"
    if not distributed.is_main():
        return _train_alongside(config, store, dataset, device, checkpoint, resume)
    trackers = open_trackers(log, config) if log else []
    trial_id = store.begin_trial(config, provenance(device))
    started = time.perf_counter()
    try:
        method = build_model(config, dataset)
        method.to(device)
        key = baseline_key(config, device)
        if baseline_cache is not None and key in baseline_cache:
            baseline = baseline_cache[key]
        else:
            baseline = evaluate(method, config.replace(probe_layers="h"), dataset, device)
            if baseline_cache is not None:
                baseline_cache[key] = baseline
        store.log_metrics(trial_id, baseline_prefixed(baseline))

        def record_epoch(record: EpochRecord) -> None:
            extra: dict[str, float] = {}
            try:
                # A resumed trial's earlier epochs are replayed before training restarts, still in eval mode.
                if epoch_hook is not None and method.training:
                    epoch_hook(method, record, extra)
                    method.train()
            finally:
                store.log_metrics(trial_id, {**record.metrics(), **extra}, epoch=record.epoch)
                for tracker in trackers:
                    tracker.epoch(record.epoch, {**record.metrics(), **extra})

        result: TrainResult = pretrain(
            method,
            config,
            dataset.train_images,
            dataset.train_labels,
            device,
            checkpoint=checkpoint,
            resume=resume,
            reporter=reporter,
            on_epoch=record_epoch,
        )
        metrics = evaluate(method, config, dataset, device)
        metrics[TRAIN_SECONDS.name] = result.train_seconds
        metrics[IMAGES_PER_S.name] = result.images_per_s
        metrics[FINAL_LOSS.name] = result.history[-1].loss
        metrics[COLLAPSE_RATIO.name] = result.history[-1].collapse_ratio
        store.log_metrics(trial_id, metrics)
        for tracker in trackers:
            tracker.final({**baseline_prefixed(baseline), **metrics})
    except KeyboardInterrupt:
        store.finish_trial(
            trial_id, "interrupted", "interrupted by the user", None, time.perf_counter() - started
        )
        raise
    except Exception as exc:  # recorded with its reason, then re-raised for the caller to report
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        store.finish_trial(trial_id, "failed", reason, None, time.perf_counter() - started)
        raise
    finally:
        for tracker in trackers:
            tracker.close()
    wall = time.perf_counter() - started
    store.finish_trial(trial_id, "done", None, result.collapsed, wall)
    distributed.barrier()  # the other processes read the recorded trial after this
    if checkpoint.exists():
        os.remove(checkpoint)
    return TrialOutcome(
        trial_id,
        config.hash(),
        "done",
        {**baseline_prefixed(baseline), **metrics},
        collapsed=result.collapsed,
        wall_time_s=wall,
    )


def _train_alongside(
    config: TrialConfig,
    store: Store,
    dataset: ImageDataset,
    device: torch.device,
    checkpoint: Path,
    resume: bool,
) -> TrialOutcome:
    """A process other than the main one: trains its share of every batch, then returns the main
    process's record of the trial."""
    method = build_model(config, dataset)
    pretrain(
        method,
        config,
        dataset.train_images,
        dataset.train_labels,
        device,
        checkpoint=checkpoint,
        resume=resume,
    )
    distributed.barrier()
    row = store.find(config.hash())
    if row is None:
        raise SslabError(f"trial {config.hash()} is missing from {store.url} after training")
    return TrialOutcome(
        row.id,
        row.config_hash,
        row.status,
        store.final_metrics(row.id),
        collapsed=row.collapsed,
        wall_time_s=row.wall_time_s,
    )


def baseline_key(config: TrialConfig, device: torch.device) -> tuple[Any, ...]:
    """What the random-init baseline depends on: data, seeded initial backbone weights, probe settings."""
    return (
        config.dataset,
        config.data_dir,
        config.image_size,
        config.train_subset,
        config.backbone,
        config.cifar_stem,
        config.seed,
        config.knn_k,
        config.knn_t,
        config.val_fraction,
        device.type,
    )


def baseline_prefixed(baseline: dict[str, float]) -> dict[str, float]:
    return {f"{BASELINE_PREFIX}{name}": value for name, value in baseline.items()}
