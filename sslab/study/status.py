"""Where a study stands, read from the store: counts by status, its trials, live workers, time estimates.

Nothing here trains or imports torch (`sslab study list|show|status` start fast).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sslab.config import TrialConfig
from sslab.errors import SslabError
from sslab.store import Store
from sslab.study.expand import StudyPlan

TERMINAL = ("done", "failed", "pruned")  # trial statuses that need no further run


@dataclass
class StudyResult:
    name: str
    total: int
    counts: dict[str, int]
    trained: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (trial, reason)


# --- where a study stands --------------------------------------------------------------------------------


def study_frame(store: Store, name: str) -> pd.DataFrame:
    return store.study_frame(name)


def summarise(plan: StudyPlan, store: Store, seconds: float, trained: int) -> StudyResult:
    frame = store.study_frame(plan.name)
    counts = {str(k): int(v) for k, v in frame["status"].value_counts().items()} if not frame.empty else {}
    total = len(frame) if plan.is_grid else int(plan.spec.n_trials or 0)
    if not plan.is_grid:
        trained_total = sum(counts.get(s, 0) for s in TERMINAL)
        counts["pending"] = max(0, total - trained_total)
    failures = []
    if not frame.empty:
        axes = [c for c in frame.columns if str(c).startswith("axis.")]
        for _, row in frame[frame["status"] == "failed"].iterrows():
            label = " ".join(f"{c[5:]}={row[c]}" for c in axes)
            failures.append((label, str(row.get("reason") or "")))
    return StudyResult(plan.name, total, counts, trained, seconds, failures)


@dataclass(frozen=True)
class StudyStatus:
    name: str
    record: dict[str, Any]
    frame: pd.DataFrame
    counts: dict[str, int]
    workers: list[tuple[str, str, str | None, str | None, float]]  # (id, host, job, trial, heartbeat age s)


def study_status(store: Store, name: str) -> StudyStatus:
    row = store.study(name)
    if row is None:
        names = [s.name for s in store.studies()]
        known = ", ".join(names) if names else "none yet"
        raise SslabError(f"no study '{name}' in {store.url}; recorded studies: {known}")
    frame = store.study_frame(name)
    counts = {str(k): int(v) for k, v in frame["status"].value_counts().items()} if not frame.empty else {}
    now = pd.Timestamp.utcnow().tz_localize(None)
    workers = [
        (w.id, w.host, w.job, w.config_hash, (now - pd.Timestamp(w.heartbeat_at)).total_seconds())
        for w in store.workers(name)
    ]
    return StudyStatus(name, json.loads(row.spec_json), frame, counts, workers)


def counts_by_study(store: Store) -> dict[str, dict[str, int]]:
    result = {}
    for row in store.studies():
        frame = store.study_frame(row.name)
        result[row.name] = (
            {str(k): int(v) for k, v in frame["status"].value_counts().items()} if not frame.empty else {}
        )
    return result


# --- time estimates ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str  # where the throughput came from
    remaining: int  # trials not finished yet


def estimate(plan: StudyPlan, store: Store) -> Estimate | None:
    """Time for the study's remaining trials from the throughput measured on finished trials in the store
    (same backbone and dataset; same method and batch size where there are such trials)."""
    frame = store.results_frame()
    if frame.empty or "images_per_s" not in frame.columns:
        return None
    done = frame[(frame["status"] == "done") & frame["images_per_s"].notna()]
    cells = list(plan.cells)
    if not cells:
        return None
    statuses = store.statuses(c.hash for c in cells)
    remaining = [c for c in cells if statuses.get(c.hash) not in TERMINAL]
    sizes: dict[tuple[Any, ...], int] = {}
    total, exact, used = 0.0, 0, 0
    for cell in remaining:
        config = cell.config
        similar = done[(done["backbone"] == config.backbone) & (done["dataset"] == config.dataset)]
        if similar.empty:
            continue
        same = similar[(similar["method"] == config.method) & (similar["batch_size"] == config.batch_size)]
        exact += not same.empty
        pick = same if not same.empty else similar
        key = (config.dataset, config.data_dir, config.image_size, config.train_subset)
        if key not in sizes:
            sizes[key] = _training_images(config, done)
        overhead = (pick["wall_time_s"] - pick["train_seconds"]).clip(lower=0).mean()
        total += sizes[key] * config.epochs / float(pick["images_per_s"].mean()) + float(overhead)
        used += 1
    if used < len(remaining):
        return None
    basis = f"{len(done)} finished trial(s) in the store; {exact}/{len(remaining)} of same method and batch"
    return Estimate(total, basis, len(remaining))


def _training_images(config: TrialConfig, done: pd.DataFrame) -> int:
    """Images per epoch of the config's data: read off a finished trial on the same data (throughput times
    training time per epoch), else counted by loading the data."""
    same_data = done[
        (done["dataset"] == config.dataset)
        & (done["image_size"].fillna(-1) == (config.image_size or -1))
        & (done["train_subset"].fillna(-1) == (config.train_subset or -1))
    ]
    if not same_data.empty:
        row = same_data.iloc[0]
        return round(float(row["images_per_s"]) * float(row["train_seconds"]) / float(row["epochs"]))
    from sslab.runner import prepare_dataset  # loads torch: only for data no finished trial has seen

    return int(prepare_dataset(config).train_images.shape[0])
