"""The one vocabulary of metric names: what each measures, which way is better, and when it is recorded.

The runner and trainer record these names, the store keeps them as (name, value, epoch) rows, study files
name them as objectives and pruning signals, and the reports show them. Probe metrics also exist per head
layer (`linear_top1_g2`, `_z` for the head's output) and for the random-init backbone (`baseline_...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction
    doc: str
    final: bool = True  # recorded once per trial (epoch None)
    per_epoch: bool = False  # recorded after every epoch
    layered: bool = False  # also recorded per head layer (_g1, _g2, ..., _z)
    percent: bool = False  # an accuracy in [0, 1], shown in percent as in the papers
    split: str | None = None  # the data it is measured on: "test" (report only) | "val" (held out from train)
    labelled: bool = False  # also recorded per share of the labels it used (`_10pct`, `_1pct`)
    swept: bool = False  # also recorded per kNN grid point (`_k20_t0.05`)


LINEAR_TOP1 = Metric(
    "linear_top1", "maximize", "linear-probe top-1 on the test set", layered=True, percent=True, split="test"
)
LINEAR_VAL_TOP1 = Metric(
    "linear_val_top1",
    "maximize",
    "linear-probe top-1 on the validation split of train",
    layered=True,
    percent=True,
    split="val",
)
PROBE_WEIGHT_DECAY = Metric("probe_weight_decay", "minimize", "weight decay the probe chose", layered=True)
KNN_TOP1 = Metric(
    "knn_top1",
    "maximize",
    "weighted-kNN top-1 on the test set",
    per_epoch=True,  # recorded per epoch by releases whose pruner read it
    layered=True,
    percent=True,
    split="test",
    swept=True,
)
KNN_VAL_TOP1 = Metric(
    "knn_val_top1",
    "maximize",
    "weighted-kNN top-1 on the validation split of train (the rest of train votes)",
    per_epoch=True,
    layered=True,
    percent=True,
    split="val",
    swept=True,
)
KNN_SWEEP_TOP1 = Metric(
    "knn_sweep_top1",
    "maximize",
    "weighted-kNN top-1 on the test set at the (k, temperature) of the grid best on the validation split",
    percent=True,
    split="test",
)
KNN_SWEEP_VAL_TOP1 = Metric(
    "knn_sweep_val_top1",
    "maximize",
    "the best weighted-kNN top-1 of the grid on the validation split of train",
    percent=True,
    split="val",
)
KNN_SWEEP_K = Metric("knn_sweep_k", "minimize", "the k the kNN grid chose on the validation split")
KNN_SWEEP_T = Metric("knn_sweep_t", "minimize", "the temperature the kNN grid chose on the validation split")
FINETUNE_TOP1 = Metric(
    "finetune_top1",
    "maximize",
    "top-1 on the test set after fine-tuning the whole backbone on the labels (_10pct: on 10% of them)",
    percent=True,
    split="test",
    labelled=True,
)
FINETUNE_VAL_TOP1 = Metric(
    "finetune_val_top1",
    "maximize",
    "top-1 on the validation split of train after fine-tuning on the rest (_10pct: on 10% of it)",
    percent=True,
    split="val",
    labelled=True,
)
RANKME = Metric(
    "rankme", "maximize", "effective rank of the backbone features (RankMe), no labels", per_epoch=True
)
ALIGNMENT = Metric(
    "alignment",
    "minimize",
    "mean squared distance of two views' normalised features (Wang & Isola 2020), no labels",
    per_epoch=True,
)
UNIFORMITY = Metric(
    "uniformity",
    "minimize",
    "log mean Gaussian potential of normalised features over image pairs (Wang & Isola 2020), no labels",
    per_epoch=True,
)
TEACHER_ENTROPY = Metric(
    "teacher_entropy",
    "maximize",
    "mean entropy of DINO's teacher output distribution (0: one-hot, log K: uniform collapse)",
    per_epoch=True,
)
LOSS = Metric("loss", "minimize", "mean training loss of the epoch", final=False, per_epoch=True)
FINAL_LOSS = Metric("final_loss", "minimize", "mean training loss of the last epoch")
OUTPUT_STD = Metric(
    "output_std", "maximize", "std of the l2-normalised outputs over the batch", final=False, per_epoch=True
)
COLLAPSE_RATIO = Metric(
    "collapse_ratio", "maximize", "output_std * sqrt(d): ~1 healthy, ~0 collapsed", per_epoch=True
)
LR = Metric("lr", "maximize", "learning rate at the end of the epoch", final=False, per_epoch=True)
IMAGES_PER_S = Metric("images_per_s", "maximize", "training images per second", per_epoch=True)
EPOCH_SECONDS = Metric("epoch_seconds", "minimize", "seconds the epoch took", final=False, per_epoch=True)
TRAIN_SECONDS = Metric("train_seconds", "minimize", "seconds of pretraining")

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        LINEAR_TOP1,
        LINEAR_VAL_TOP1,
        PROBE_WEIGHT_DECAY,
        KNN_TOP1,
        KNN_VAL_TOP1,
        KNN_SWEEP_TOP1,
        KNN_SWEEP_VAL_TOP1,
        KNN_SWEEP_K,
        KNN_SWEEP_T,
        FINETUNE_TOP1,
        FINETUNE_VAL_TOP1,
        RANKME,
        ALIGNMENT,
        UNIFORMITY,
        TEACHER_ENTROPY,
        LOSS,
        FINAL_LOSS,
        OUTPUT_STD,
        COLLAPSE_RATIO,
        LR,
        IMAGES_PER_S,
        EPOCH_SECONDS,
        TRAIN_SECONDS,
    )
}
BASELINE_PREFIX = "baseline_"  # the same probe on the untrained backbone
_LAYER = re.compile(r"^(.*?)(_g\d+|_z)$")
_LABELLED = re.compile(r"^(.*?)_([0-9.]+)pct$")
_SWEPT = re.compile(r"^(.*?)_k(\d+)_t([0-9.]+)$")
KNN_GRID_K = (10, 20, 50, 100, 200)  # `knn_sweep`: Wu et al. 2018 use k=200, t=0.07; DINO k=20, t=0.07
KNN_GRID_T = (0.02, 0.05, 0.07, 0.1, 0.2, 0.5)


def layer_name(metric: Metric, layer: str) -> str:
    """The name of a layered metric at one layer: `h` is the backbone (no suffix), else `g1`, ..., `z`."""
    return metric.name if layer == "h" else f"{metric.name}_{layer}"


def lookup(name: str) -> Metric | None:
    """The vocabulary entry behind a recorded name (layer suffix and baseline prefix allowed), or None."""
    base = name.removeprefix(BASELINE_PREFIX)
    if base in METRICS:
        return METRICS[base]
    for pattern, flag in ((_LAYER, "layered"), (_LABELLED, "labelled"), (_SWEPT, "swept")):
        match = pattern.match(base)
        if match and match[1] in METRICS and getattr(METRICS[match[1]], flag):
            return METRICS[match[1]]
    return None


def labelled_name(metric: Metric, percent: float) -> str:
    """A labelled metric for one share of the labels: 100 -> `finetune_top1`, 10 -> `finetune_top1_10pct`."""
    return metric.name if percent == 100 else f"{metric.name}_{percent:g}pct"


def swept_name(metric: Metric, k: int, temperature: float) -> str:
    """A kNN metric at one grid point: `knn_top1_k20_t0.05`."""
    return f"{metric.name}_k{k}_t{temperature:g}"


def is_metric(name: str) -> bool:
    return lookup(name) is not None


def objectives() -> list[str]:
    """Final metrics a study may optimise (examples for error messages)."""
    return [m.name for m in METRICS.values() if m.final]


def epoch_metrics() -> dict[str, Direction]:
    """Per-epoch metrics, with the direction in which they improve."""
    return {m.name: m.direction for m in METRICS.values() if m.per_epoch}


def validation_twin(name: str) -> str | None:
    """The validation metric to select on in place of a test one: `linear_top1_g2` -> `linear_val_top1_g2`."""
    metric = lookup(name)
    if metric is None or metric.split != "test":
        return None
    twin = {
        LINEAR_TOP1.name: LINEAR_VAL_TOP1.name,
        KNN_TOP1.name: KNN_VAL_TOP1.name,
        KNN_SWEEP_TOP1.name: KNN_SWEEP_VAL_TOP1.name,
        FINETUNE_TOP1.name: FINETUNE_VAL_TOP1.name,
    }[metric.name]
    return twin + name.removeprefix(BASELINE_PREFIX).removeprefix(metric.name)


def scale(name: str) -> tuple[float, str]:
    """Accuracies are shown in percent, as in the papers; everything else as stored."""
    metric = lookup(name)
    return (100.0, "%") if metric is not None and metric.percent else (1.0, "")
