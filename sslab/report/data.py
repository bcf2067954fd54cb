"""Study results as tidy frames: axis and metric lookup, filtering, ordering and aggregation over seeds."""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sslab import metrics
from sslab.config import TrialConfig, is_known_key
from sslab.errors import ConfigError, SslabError
from sslab.report.stats import describe
from sslab.store import Store

AXIS = "axis."
SEED = "seed"
OP_ORDER = ("crop", "cutout", "color", "sobel", "noise", "blur", "rotate")  # SimCLR Fig. 5
STAT_COLUMNS = ("mean", "std", "count", "ci95")
INT_COLUMNS = {"id"} | {
    name for name, kind in typing.get_type_hints(TrialConfig).items() if int in (kind, *typing.get_args(kind))
}


def study_trials(store: Store, study: str) -> pd.DataFrame:
    """The study's trials, one row each with `axis.NAME` columns, any status; error for an unknown study."""
    frame = store.study_frame(study)
    if frame.empty:
        names = [row.name for row in store.studies()]
        known = f"; studies in the store: {', '.join(names)}" if names else "; the store has no studies yet"
        raise SslabError(f"no study named '{study}' with trials{known}")
    for column in axis_columns(frame):
        frame[column] = frame[column].map(_hashable)
    for column in INT_COLUMNS & set(frame.columns):  # pending rows made these floats: 4.0 -> 4, NaN -> None
        if frame[column].dtype.kind == "f":
            ints = [None if pd.isna(v) else int(v) for v in frame[column]]
            frame[column] = pd.Series(ints, index=frame.index, dtype=object)
    return frame


def load_study(store: Store, study: str) -> pd.DataFrame:
    """study_trials(), and an error if none of them has finished."""
    frame = study_trials(store, study)
    if not (frame["status"] == "done").any():
        counts = ", ".join(f"{n} {s}" for s, n in frame["status"].value_counts().items())
        raise SslabError(f"study '{study}' has no finished trials yet ({counts}); run it first")
    return frame


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def axis_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith(AXIS)]


def axis_names(frame: pd.DataFrame, with_seed: bool = False) -> list[str]:
    names = [c[len(AXIS) :] for c in axis_columns(frame)]
    return [n for n in names if with_seed or n != SEED]


def column_for(frame: pd.DataFrame, name: str) -> str:
    """The frame column for an axis name (or, failing that, a config field); error listing valid names."""
    if f"{AXIS}{name}" in frame.columns:
        return f"{AXIS}{name}"
    field = name.replace("-", "_")
    if is_known_key(field) and field in frame.columns:
        return field
    axes = ", ".join(axis_names(frame, with_seed=True)) or "none"
    raise ConfigError(f"unknown axis '{name}'; the study's axes are: {axes} (or any config field)")


def label_of(column: str) -> str:
    return column[len(AXIS) :] if column.startswith(AXIS) else column


def metric_names(frame: pd.DataFrame) -> list[str]:
    """Numeric final metrics recorded for at least one finished trial."""
    done = frame[frame["status"] == "done"]
    names = []
    for column in done.columns:
        if not metrics.is_metric(str(column)):
            continue
        values = pd.to_numeric(done[column], errors="coerce")
        if values.notna().any():
            names.append(str(column))
    return sorted(names)


def check_metric(frame: pd.DataFrame, metric: str) -> None:
    valid = metric_names(frame)
    if metric not in valid:
        raise ConfigError(f"unknown metric '{metric}'; recorded metrics: {', '.join(valid) or 'none'}")


def metric_scale(metric: str) -> tuple[float, str]:
    """Accuracies are shown in percent, as in the papers; everything else as stored."""
    return metrics.scale(metric)


def baseline_value(frame: pd.DataFrame, metric: str) -> float | None:
    """Mean over seeds of the metric's random-init counterpart (`baseline_<metric>`), in the metric's display
    unit. None where it was not recorded, or where it differs between trials of one seed (the study varies
    the backbone or the data, so no single number is the baseline)."""
    column = f"baseline_{metric}"
    if column not in frame or frame[column].isna().all():
        return None
    recorded = frame.dropna(subset=[column])
    per_seed = recorded.groupby("axis.seed")[column] if "axis.seed" in recorded else [(0, recorded[column])]
    values = []
    for _, group in per_seed:
        if group.max() - group.min() > 1e-9:
            return None
        values.append(float(group.iloc[0]))
    return float(np.mean(values)) * metric_scale(metric)[0]


def metric_label(metric: str) -> str:
    unit = metric_scale(metric)[1]
    return f"{metric} ({unit})" if unit else metric


def matches(value: Any, wanted: str) -> bool:
    """Whether a stored value equals a value typed on the command line (numbers compared as numbers)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return wanted.lower() in ("none", "null", "")
    try:
        return float(value) == float(wanted)
    except (TypeError, ValueError):
        return str(value).lower() == wanted.lower()


def apply_where(frame: pd.DataFrame, where: Mapping[str, str]) -> pd.DataFrame:
    """Keep the trials whose axis (or config field) values equal the given ones."""
    for name, wanted in where.items():
        column = column_for(frame, name)
        keep = frame[column].map(lambda v, w=wanted: matches(v, w))
        if not keep.any():
            values = ", ".join(str(v) for v in order_values(frame[column].dropna().unique()))
            raise ConfigError(f"no trial has {name}={wanted}; its values are: {values}")
        frame = frame[keep]
    return frame


def parse_where(items: Sequence[str]) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--where expects axis=value, got {item!r}")
        result[key.strip()] = value.strip()
    return result


def order_values(values: Iterable[Any]) -> list[Any]:
    """Axis values in reading order: numbers ascending, augmentation ops as in SimCLR Fig. 5, else as met."""
    unique = list(
        dict.fromkeys(plain_value(v) for v in values if not (isinstance(v, float) and math.isnan(v)))
    )
    if all(isinstance(v, bool | np.bool_) for v in unique):
        return sorted(unique)
    if all(isinstance(v, int | float | np.integer | np.floating) for v in unique):
        return sorted(unique)
    if all(isinstance(v, str) for v in unique):
        known = [op for op in OP_ORDER if op in unique]
        return known + [v for v in unique if v not in OP_ORDER]
    return unique


def check_single_valued(frame: pd.DataFrame, used: Iterable[str]) -> None:
    """Fail when an axis that is neither plotted nor the seed still varies: its trials would be mixed."""
    used = set(used)
    for column in axis_columns(frame):
        if column in used or column == f"{AXIS}{SEED}":
            continue
        values = order_values(frame.loc[frame["status"] == "done", column].dropna().unique())
        if len(values) > 1:
            name = label_of(column)
            shown = ", ".join(str(v) for v in values)
            raise ConfigError(
                f"the study also varies '{name}' ({shown}); choose one with --where {name}=VALUE"
            )


def summarize(frame: pd.DataFrame, by: Sequence[str], metric: str, scale: float = 1.0) -> pd.DataFrame:
    """One row per combination of the `by` columns over finished trials: mean, std, count, ci95 of metric."""
    done = frame[frame["status"] == "done"].copy()
    done[metric] = pd.to_numeric(done[metric], errors="coerce") * scale
    rows = []
    for key, group in done.groupby(list(by), dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        mean, std, count, ci95 = describe(group[metric].tolist())
        if count:
            rows.append(
                {**dict(zip(by, key, strict=True)), "mean": mean, "std": std, "count": count, "ci95": ci95}
            )
    return pd.DataFrame(rows, columns=[*by, *STAT_COLUMNS])


def unique_text(frame: pd.DataFrame, column: str) -> str:
    """The distinct values of a column among finished trials, joined with '/' (for titles)."""
    if column not in frame.columns:
        return "?"
    values = order_values(frame.loc[frame["status"] == "done", column].dropna().unique())
    return "/".join(str(v) for v in values) or "?"


def plain_value(value: Any) -> Any:
    """2.0 -> 2: integer fields read back as floats when some rows of the frame are empty."""
    return int(value) if isinstance(value, float | np.floating) and float(value).is_integer() else value


def study_title(frame: pd.DataFrame) -> str:
    """dataset, method, backbone, epochs: the setting a figure was measured in."""
    return (
        f"{unique_text(frame, 'dataset')} · {unique_text(frame, 'method')} · "
        f"{unique_text(frame, 'backbone')} · {unique_text(frame, 'epochs')} epochs"
    )


def format_value(value: float, unit: str) -> str:
    """Percentages with one decimal (as in the papers' tables), other metrics with four significant digits."""
    if value is None or math.isnan(value):
        return ""
    return f"{value:.1f}" if unit == "%" else f"{value:.4g}"


def fill_axes(frame: pd.DataFrame, given: Sequence[str | None]) -> list[str]:
    """The given axes, each None replaced by an unused study axis (first and second before the others)."""
    names = axis_names(frame)
    preferred = [a for a in ("first", "second") if a in names] + [
        a for a in names if a not in ("first", "second")
    ]
    free = [a for a in preferred if a not in given]
    if given.count(None) > len(free):
        raise ConfigError(
            f"this needs {len(given)} axes but the study has {len(names)} besides the seed "
            f"({', '.join(names) or 'none'}); name config fields with --rows/--cols instead"
        )
    spare = iter(free)
    return [name if name is not None else next(spare) for name in given]


def figure_title(study: str, frame: pd.DataFrame, metric: str) -> str:
    """Two lines: study, metric and seeds; then dataset, method, backbone and epochs."""
    done = frame[frame["status"] == "done"]
    seed_column = f"{AXIS}{SEED}"
    cells = [c for c in done.columns if c.startswith(AXIS) and c != seed_column]
    if seed_column not in done.columns or done.empty:
        fewest = most = 1
    elif cells:  # seeds per cell, which may differ (a follow-up with fewer seeds at a larger budget)
        per_cell = done.groupby(cells, dropna=False)[seed_column].nunique()
        fewest, most = int(per_cell.min()), int(per_cell.max())
    else:
        fewest = most = int(done[seed_column].nunique())
    seeds = str(most) if fewest == most else f"{fewest}-{most}"
    suffix = f", mean over {seeds} seeds" if most > 1 else ""
    return f"{study}: {metric_label(metric)}{suffix}\n{study_title(frame)}"
