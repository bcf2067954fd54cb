"""Per-epoch training metrics of a study's trials (loss, kNN, collapse ratio, label-free metrics, DINO's
teacher entropy): one panel per metric, a line per group of trials, mean ± std over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sslab.errors import ConfigError
from sslab.metrics import (
    ALIGNMENT,
    COLLAPSE_RATIO,
    KNN_TOP1,
    KNN_VAL_TOP1,
    LOSS,
    RANKME,
    TEACHER_ENTROPY,
    UNIFORMITY,
)
from sslab.report.data import apply_where, axis_names, load_study, metric_scale, plain_value
from sslab.report.figures import add_notes, check_output, new_figure, save_figure
from sslab.store import Store

# Per-epoch metrics drawn when recorded, three panels to a row.
CURVE_METRICS = (
    LOSS.name,
    KNN_TOP1.name,
    KNN_VAL_TOP1.name,
    COLLAPSE_RATIO.name,
    RANKME.name,
    ALIGNMENT.name,
    UNIFORMITY.name,
    TEACHER_ENTROPY.name,
)
PANELS_PER_ROW = 3


def learning_curve_frame(store: Store, frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per-epoch metrics of the finished trials: mean, std and count over seeds per group and epoch."""
    records = []
    for _, trial in frame[frame["status"] == "done"].iterrows():
        group = " · ".join(f"{plain_value(trial[c])}" for c in by) or "all"
        for row in store.metrics(int(trial["id"])):
            if row.epoch is not None and row.name in CURVE_METRICS:
                records.append({"group": group, "metric": row.name, "epoch": row.epoch, "value": row.value})
    if not records:
        return pd.DataFrame(columns=["group", "metric", "epoch", "mean", "std", "count"])
    long = pd.DataFrame(records)
    stats = long.groupby(["group", "metric", "epoch"], sort=False)["value"].agg(["mean", "std", "count"])
    return stats.reset_index()


def plot_learning_curves(store: Store, frame: pd.DataFrame, by: Sequence[str], title: str) -> Figure | None:
    """One panel per recorded per-epoch metric (loss, kNN top-1, collapse ratio, label-free metrics), a line
    per group."""
    curves = learning_curve_frame(store, frame, by)
    if curves.empty:
        return None
    metrics = [m for m in CURVE_METRICS if m in set(curves["metric"])]
    columns = min(PANELS_PER_ROW, len(metrics))
    rows_of_panels = -(-len(metrics) // columns)
    figure = new_figure(4.2 * columns + 2.2, 3.8 * rows_of_panels)  # + the legend beside the panels
    grid = figure.subplots(rows_of_panels, columns, squeeze=False).flatten()
    for ax in grid[len(metrics) :]:
        ax.set_visible(False)
    axes = grid[: len(metrics)]
    for ax, metric in zip(axes, metrics, strict=True):
        scale, unit = metric_scale(metric)
        for group, rows in curves[curves["metric"] == metric].groupby("group", sort=False):
            rows = rows.sort_values("epoch")
            mean, std = rows["mean"].to_numpy() * scale, np.nan_to_num(rows["std"].to_numpy() * scale)
            (line,) = ax.plot(rows["epoch"], mean, marker="o", markersize=3, label=str(group))
            ax.fill_between(rows["epoch"], mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
        ax.grid(color="0.9")
        epochs = sorted(set(curves["epoch"]))
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[columns - 1].legend(  # beside the first row's last panel, where it covers no line
        title=" · ".join(c.removeprefix("axis.") for c in by) or None,
        fontsize=8,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
    )
    figure.suptitle(title, fontsize=10)
    replicated = bool((curves["count"] >= 2).any())
    add_notes(figure, ["lines: mean over seeds; bands: ± std" if replicated else "one seed per line"])
    return figure


def render_training_curves(
    store: Store,
    study: str,
    out: str | Path | None = None,
    where: Mapping[str, str] | None = None,
) -> Path:
    """The study's per-epoch metrics, a line per cell of its axes (seeds averaged), written with its numbers
    as CSV beside it."""
    path = check_output(out if out is not None else Path("results") / f"{study}-training.png")
    frame = apply_where(load_study(store, study), where or {})
    groups = [f"axis.{a}" for a in axis_names(frame)]
    figure = plot_learning_curves(store, frame, groups, f"{study}: per-epoch training metrics")
    if figure is None:
        raise ConfigError(f"study {study} has no finished trial with per-epoch metrics")
    return save_figure(figure, path, learning_curve_frame(store, frame, groups))
