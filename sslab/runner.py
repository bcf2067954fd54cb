"""Run one trial end to end: data -> random-init baseline -> pretraining -> evaluation -> results store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

import sslab
from sslab import distributed, label_free, weights
from sslab.batches import ImageParts
from sslab.config import FINETUNE_FIELDS, SHARED_FIELDS, TrialConfig
from sslab.data import ImageDataset, load_dataset
from sslab.data.resize import match_channels
from sslab.errors import ConfigError, DatasetError, SslabError
from sslab.evaluate import extract_features, knn_grid, knn_top1, knn_val_top1, linear_probe, stratified_split
from sslab.finetune import finetune
from sslab.methods.base import Method, build_method
from sslab.metrics import (
    BASELINE_PREFIX,
    COLLAPSE_RATIO,
    FINAL_LOSS,
    IMAGES_PER_S,
    KNN_GRID_K,
    KNN_GRID_T,
    KNN_SWEEP_K,
    KNN_SWEEP_T,
    KNN_SWEEP_TOP1,
    KNN_SWEEP_VAL_TOP1,
    KNN_TOP1,
    KNN_VAL_TOP1,
    LINEAR_TOP1,
    LINEAR_VAL_TOP1,
    PROBE_WEIGHT_DECAY,
    TRAIN_SECONDS,
    layer_name,
    swept_name,
)
from sslab.models import backbone_for
from sslab.pipeline import derived_seed
from sslab.store import Provenance, Store
from sslab.tracking import open_trackers
from sslab.train import (
    EpochRecord,
    PrecisionWarning,
    Reporter,
    TrainResult,
    autocast_dtype,
    channel_stats,
    emulated_precision_warning,
    plan_views,
    precision_name,
    pretrain,
    resolve_device,
)

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


def provenance(device: torch.device, config: TrialConfig | None = None) -> Provenance:
    """Where and how `config`'s trial runs (its precision with `auto` resolved for `device`)."""
    name = str(device)
    if device.type == "cuda":
        name = f"{device} ({torch.cuda.get_device_name(device)})"
    computed_in = None
    if config is not None:
        computed_in = precision_name(autocast_dtype(config.precision, device, config.pipeline_version))
    return Provenance(
        name,
        torch.__version__,
        sslab.__version__,
        git_commit(),
        platform.node(),
        torch.get_num_threads(),
        computed_in,
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
        dataset = dataclasses.replace(dataset, train_images=images, train_labels=labels)
    return dataset


def pretraining_set(config: TrialConfig, dataset: ImageDataset) -> tuple[Tensor | ImageParts, Tensor]:
    """The images pretraining sees and their labels: train, then (`pretrain_unlabelled`) the unlabelled
    split, labelled -1, read in place rather than copied together."""
    if not config.pretrain_unlabelled:
        return dataset.train_images, dataset.train_labels
    extra = dataset.unlabelled_images
    if extra is None:
        raise DatasetError(
            f"{config.dataset} was found without its unlabelled images (unlabeled_X.bin for stl10); "
            "add the file or drop pretrain_unlabelled"
        )
    labels = torch.cat([dataset.train_labels, torch.full((extra.shape[0],), -1, dtype=torch.long)])
    return ImageParts(dataset.train_images, extra), labels


@dataclass(frozen=True)
class DataFormat:
    """What a model is built for and how its inputs are normalised: the pretraining data's format."""

    channels: int
    image_size: int
    num_classes: int
    mean: Tensor  # (1, C, 1, 1), [0, 1] units
    std: Tensor

    @classmethod
    def of(cls, dataset: ImageDataset, images: Tensor | ImageParts | None = None) -> DataFormat:
        """The format of `dataset`, normalised by the statistics of `images`, those pretrained on
        (default: the train images)."""
        mean, std = channel_stats(dataset.train_images if images is None else images)
        return cls(dataset.channels, dataset.image_size, dataset.num_classes, mean, std)


def build_model(config: TrialConfig, data: ImageDataset | DataFormat) -> Method:
    torch.manual_seed(config.seed)
    backbone = backbone_for(config, data.channels, data.image_size)
    return build_method(config, backbone, data.num_classes)


def evaluation_dataset(config: TrialConfig, data: DataFormat) -> ImageDataset:
    """The probe dataset of a transfer trial, fitted to the pretraining data's channels and image size."""
    assert config.probe_dataset is not None
    dataset = load_dataset(config.probe_dataset, data_dir=config.data_dir, image_size=data.image_size)
    return match_channels(dataset, data.channels)


def evaluate(
    method: Method,
    config: TrialConfig,
    dataset: ImageDataset,
    device: torch.device,
    mean: Tensor | None = None,
    std: Tensor | None = None,
) -> dict[str, float]:
    """Linear-probe and kNN test top-1 on frozen features at h (and every head layer if asked).

    Inputs are normalised by `mean` and `std` (default: those of `dataset`; a transfer trial passes the
    pretraining data's, which the backbone was trained with).
    """
    if mean is None or std is None:
        mean, std = channel_stats(dataset.train_images)
    dataset = dataclasses.replace(
        dataset, train_labels=dataset.train_labels.to(device), test_labels=dataset.test_labels.to(device)
    )
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
    if config.knn_sweep:
        metrics.update(_knn_sweep(config, train["h"], test["h"], dataset))
    deepest = max((int(layer[1:]) for layer in train if layer != "h"), default=0)
    if deepest:  # z = g(h), the head's output, whatever its depth (SimCLR Fig. 8 probes h against z)
        for metric in (LINEAR_TOP1, KNN_TOP1):
            metrics[layer_name(metric, "z")] = metrics[layer_name(metric, f"g{deepest}")]
    return metrics


def _knn_sweep(config: TrialConfig, train: Tensor, test: Tensor, dataset: ImageDataset) -> dict[str, float]:
    """kNN top-1 over the (k, temperature) grid on test, and with a validation split, on it too, with the
    test number at the pair the split chose (`knn_sweep_top1`)."""
    args = (dataset.num_classes, KNN_GRID_K, KNN_GRID_T)
    grid = knn_grid(train, dataset.train_labels, test, dataset.test_labels, *args)
    metrics = {swept_name(KNN_TOP1, k, t): top1 for (k, t), top1 in grid.items()}
    if config.val_fraction > 0:
        fit, val = stratified_split(dataset.train_labels, config.val_fraction)
        labels = dataset.train_labels
        val_grid = knn_grid(train[fit], labels[fit], train[val], labels[val], *args)
        metrics.update({swept_name(KNN_VAL_TOP1, k, t): top1 for (k, t), top1 in val_grid.items()})
        k, t = max(val_grid, key=lambda key: (val_grid[key], key[0], key[1]))  # ties: the larger k, t
        metrics.update(
            {
                KNN_SWEEP_TOP1.name: grid[k, t],
                KNN_SWEEP_VAL_TOP1.name: val_grid[k, t],
                KNN_SWEEP_K.name: k,
                KNN_SWEEP_T.name: t,
            }
        )
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
    weights_dir: Path | None = None,
    keep_weights: bool = True,
) -> TrialOutcome:
    """Pretrain and evaluate `config`, recording everything in `store`.

    `epoch_hook` runs after each trained epoch; the metrics it puts in its dict are recorded with the epoch,
    and it may raise to stop the trial (pruning). `baseline_cache` reuses the random-init baseline across
    trials that share its `baseline_key`. `log` names trackers (`tensorboard`, `wandb`) that also get the
    per-epoch and final metrics.

    A config whose hash is already `done` in the store is not trained again unless `force`. Trained weights
    are kept in `weights_dir` (`sslab.weights`) under the trial's pretraining hash, and a trial that differs
    from a finished one only in its evaluation (probe dataset, fine-tuning, kNN sweep, ...) loads them
    instead of pretraining, if the trial that trained them is done in `store` (not with `force`); its
    per-epoch rows are those of the pretraining it reuses, and the trial records which (`pretrained_from`).
    With `resume`, training continues from the trial's last per-epoch checkpoint. Failures are recorded with
    their reason; an interruption (Ctrl-C) is recorded as `interrupted` and re-raised.
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
    if config.method_version != config.info.version:
        raise ConfigError(
            f"{config.method} behaviour version {config.method_version} is found in the store, not trained: "
            f"this release trains version {config.info.version} (leave method_version out)"
        )
    device = distributed.init(resolve_device(config.device))  # this process's device under torchrun
    distributed.check_method(config.info)
    distributed.local_batch_size(config.batch_size)  # the global batch must split over the processes
    pretrained = None if force else _reusable(config, store, weights_dir)
    if dataset is None and (pretrained is None or config.probe_dataset is None):
        dataset = prepare_dataset(config)
    checkpoint = checkpoint_dir / f"{config.hash()}.pt"
    if not distributed.is_main():
        return _train_alongside(config, store, dataset, device, checkpoint, resume, pretrained)
    trackers = open_trackers(log, config) if log else []
    slow = emulated_precision_warning(config.precision, device)
    if slow is not None:
        warnings.warn(slow, PrecisionWarning, stacklevel=2)
    trial_id = store.begin_trial(config, provenance(device, config))
    started = time.perf_counter()
    try:
        assert dataset is not None or pretrained is not None
        if pretrained is not None:
            data = _format(pretrained)
        else:
            pretrain_images, pretrain_labels = pretraining_set(config, cast(ImageDataset, dataset))
            data = DataFormat.of(cast(ImageDataset, dataset), pretrain_images)
        probe_data = evaluation_dataset(config, data) if config.probe_dataset else cast(ImageDataset, dataset)
        method = build_model(config, data)
        if config.finetune_labels and config.finetune_from == "g1" and not _has_hidden_head_layer(method):
            raise ConfigError(f"finetune_from=g1: method {config.method} has no head with a hidden layer")
        method.to(device)
        key = baseline_key(config, device)
        stored_key = baseline_hash(config, device)
        if baseline_cache is not None and key in baseline_cache:
            baseline = baseline_cache[key]
        else:
            baseline = store.baseline(stored_key) or {}
            if not baseline:
                baseline_config = config.replace(probe_layers="h", knn_sweep=False, finetune_labels="")
                baseline = evaluate(method, baseline_config, probe_data, device, data.mean, data.std)
                store.save_baseline(stored_key, baseline)
            if baseline_cache is not None:
                baseline_cache[key] = baseline
        if pretrained is None:
            label_free_now = _label_free(config, cast(ImageDataset, dataset), data, device)
            label_free_baseline = label_free_now(method)
        else:
            label_free_baseline = pretrained.baseline
        store.log_metrics(trial_id, baseline_prefixed({**baseline, **label_free_baseline}))

        def measure(method: Method, record: EpochRecord) -> dict[str, float]:
            """After each trained epoch, before its checkpoint: kept in the record, so replayed on resume."""
            extra = label_free_now(method)
            if epoch_hook is not None:
                seen = dataclasses.replace(record, extra={**record.extra, **extra})
                try:
                    epoch_hook(method, seen, extra)
                except BaseException:  # a pruned trial keeps the epoch that decided it
                    store.log_metrics(trial_id, {**seen.metrics(), **extra}, epoch=record.epoch)
                    raise
            return extra

        def record_epoch(record: EpochRecord) -> None:
            store.log_metrics(trial_id, record.metrics(), epoch=record.epoch)
            for tracker in trackers:
                tracker.epoch(record.epoch, record.metrics())

        if pretrained is None:
            assert dataset is not None
            result: TrainResult = pretrain(
                method,
                config,
                pretrain_images,
                pretrain_labels,
                device,
                checkpoint=checkpoint,
                resume=resume,
                reporter=reporter,
                on_epoch=record_epoch,
                measure=measure,
            )
            if keep_weights:
                weights.save(_trained_weights(config, method, data, result, label_free_baseline), weights_dir)
        else:
            method.load_state_dict(pretrained.state)
            method.eval()
            result = _reused_history(pretrained)
            for record in result.history:
                record_epoch(record)
            store.set_pretrained_from(trial_id, pretrained.trial_hash)
        metrics = evaluate(method, config, probe_data, device, data.mean, data.std)
        if config.finetune_labels:
            metrics.update(
                finetune(
                    method,
                    config,
                    probe_data.train_images,
                    probe_data.train_labels,
                    probe_data.test_images,
                    probe_data.test_labels,
                    probe_data.num_classes,
                    data.mean,
                    data.std,
                    device,
                    autocast_dtype(config.precision, device, config.pipeline_version),
                )
            )
        metrics.update(result.history[-1].extra)  # the label-free metrics of the last epoch
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
        {**baseline_prefixed({**baseline, **label_free_baseline}), **metrics},
        collapsed=result.collapsed,
        wall_time_s=wall,
    )


def _has_hidden_head_layer(method: Method) -> bool:
    return method.head is not None and len(method.head.layers) >= 2


def _reusable(config: TrialConfig, store: Store, weights_dir: Path | None) -> weights.TrainedWeights | None:
    """Kept weights of this trial's pretraining, if the trial that trained them is done in this store (so
    that `pretrained_from` names a trial the store holds)."""
    kept = weights.load(config.pretraining_hash(), weights_dir)
    if kept is None:
        return None
    source = store.find(kept.trial_hash)
    return kept if source is not None and source.status == "done" else None


def _label_free(
    config: TrialConfig, dataset: ImageDataset, data: DataFormat, device: torch.device
) -> Callable[[Method], dict[str, float]]:
    """RankMe, alignment and uniformity of a method's backbone on a fixed sample of the training images."""
    sample = label_free.sample_indices(dataset.train_images.shape[0], derived_seed(config.seed, "label-free"))
    images = dataset.train_images[sample].to(device)
    views = plan_views(config, data.image_size)
    mean, std = data.mean.to(device), data.std.to(device)
    seed = derived_seed(config.seed, "label-free-views")

    def measure(method: Method) -> dict[str, float]:
        channels_last = device.type != "mps" and bool(getattr(method.backbone, "channels_last", True))
        return label_free.measure(method.backbone, images, views, mean, std, seed, channels_last)

    return measure


def _format(pretrained: weights.TrainedWeights) -> DataFormat:
    return DataFormat(
        pretrained.channels, pretrained.image_size, pretrained.num_classes, pretrained.mean, pretrained.std
    )


def _trained_weights(
    config: TrialConfig,
    method: Method,
    data: DataFormat,
    result: TrainResult,
    baseline: dict[str, float],
) -> weights.TrainedWeights:
    return weights.TrainedWeights(
        pretraining_hash=config.pretraining_hash(),
        trial_hash=config.hash(),
        config=config.record(),
        state=method.state_dict(),
        channels=data.channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        history=[record.__dict__ for record in result.history],
        baseline=baseline,
        train_seconds=result.train_seconds,
        images_per_s=result.images_per_s,
        collapsed=result.collapsed,
    )


def _reused_history(pretrained: weights.TrainedWeights) -> TrainResult:
    history = [EpochRecord(**record) for record in pretrained.history]
    return TrainResult(history=history, train_seconds=pretrained.train_seconds)


def _train_alongside(
    config: TrialConfig,
    store: Store,
    dataset: ImageDataset | None,
    device: torch.device,
    checkpoint: Path,
    resume: bool,
    pretrained: weights.TrainedWeights | None,
) -> TrialOutcome:
    """A process other than the main one: trains its share of every batch (unless the main process reuses
    kept weights), then returns the main process's record of the trial."""
    if pretrained is None:
        assert dataset is not None
        method = build_model(config, dataset)
        pretrain(
            method,
            config,
            *pretraining_set(config, dataset),
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
        config.method if config.info.own_backbone else None,
        config.dataset,
        config.data_dir,
        config.image_size,
        config.train_subset,
        config.pretrain_unlabelled,  # the images' normalisation statistics
        config.backbone,
        config.cifar_stem,
        config.resnet_width,
        config.patch_size,
        config.vit_pool,
        config.seed,
        config.knn_k,
        config.knn_t,
        config.val_fraction,
        config.probe_dataset,
        device.type,
    )


# Fields the random-init probe does not depend on: what is trained and how, not the data, the initial backbone
# or the probe. A field missing here only splits the stored baselines, never merges different ones.
_NOT_IN_BASELINE = {
    "method",
    "aug",
    "aug1",
    "aug2",
    "head",
    "head_width",
    "out_dim",
    "head_bn",
    "local_crops",
    "local_size",
    "local_scale",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "epochs",
    "batch_size",
    "precision",
    "sync_bn",
    "probe_layers",
    "knn_sweep",
    "finetune_labels",
    *FINETUNE_FIELDS,
}


# Fields added after baselines were first stored, with the default that keeps what older ones computed.
_ADDED_SINCE = {"pretrain_unlabelled": False}


def baseline_hash(config: TrialConfig, device: torch.device) -> str:
    """The key of a stored random-init baseline: every field it may depend on, as set, and the device type."""
    fields = {name: getattr(config, name) for name in SHARED_FIELDS if name not in _NOT_IN_BASELINE}
    for name, default in _ADDED_SINCE.items():  # at their defaults, older baselines keep their key
        if fields[name] == default:
            del fields[name]
    if config.info.own_backbone:
        fields["method"] = config.method
    payload = json.dumps({**fields, "device": device.type, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def baseline_prefixed(baseline: dict[str, float]) -> dict[str, float]:
    return {f"{BASELINE_PREFIX}{name}": value for name, value in baseline.items()}
