"""Any axis on x, another as hue: curves (SimCLR Fig. 8) and grouped bars (Fig. 9), seeds as error bars."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sslab.errors import ConfigError
from sslab.report.data import (
    apply_where,
    baseline_value,
    check_metric,
    check_single_valued,
    column_for,
    figure_title,
    format_value,
    label_of,
    load_study,
    metric_label,
    metric_scale,
    order_values,
    summarize,
)
from sslab.report.figures import add_notes, check_output, new_figure, save_figure
from sslab.store import Store

ERRORS = ("std", "ci", "none")
ERROR_NOTES = {"std": "error bars: ± std over seeds", "ci": "error bars: 95% CI over seeds (t distribution)"}
NO_HUE = ""


@dataclass
class Series:
    """Means over seeds for each (hue, x); NaN where no trial finished."""

    x_axis: str
    hue_axis: str | None
    xs: list
    hues: list  # [NO_HUE] without a hue axis
    mean: np.ndarray  # (H, X)
    std: np.ndarray  # (H, X)
    ci95: np.ndarray  # (H, X)
    count: np.ndarray  # (H, X)
    metric: str
    unit: str

    @property
    def numeric_x(self) -> bool:
        return all(
            isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) for x in self.xs
        )

    @property
    def replicated(self) -> bool:
        """Whether any point has two or more seeds, so that there is a spread to draw."""
        return bool((self.count >= 2).any())

    def errors(self, kind: str) -> np.ndarray | None:
        """Error bar half-lengths (H, X), NaN (no bar) at points of one seed; None when none are drawn
        (asked so, or a single seed everywhere)."""
        if not self.replicated or kind == "none":
            return None
        return np.where(self.count >= 2, {"std": self.std, "ci": self.ci95}[kind], np.nan)

    def to_frame(self) -> pd.DataFrame:
        """Exactly the plotted numbers, one row per (hue, x)."""
        records = []
        for h, hue in enumerate(self.hues):
            for i, x in enumerate(self.xs):
                record = {self.x_axis: x}
                if self.hue_axis is not None:
                    record[self.hue_axis] = hue
                record.update(metric=self.metric, unit=self.unit, mean=self.mean[h, i], std=self.std[h, i])
                record.update(count=int(self.count[h, i]), ci95=self.ci95[h, i])
                records.append(record)
        return pd.DataFrame(records)


def series_data(frame: pd.DataFrame, x: str, hue: str | None, metric: str) -> Series:
    x_column = column_for(frame, x)
    hue_column = column_for(frame, hue) if hue else None
    if hue_column == x_column:
        raise ConfigError("--x and --hue must be two different axes")
    check_metric(frame, metric)
    check_single_valued(frame, [c for c in (x_column, hue_column) if c])
    scale, unit = metric_scale(metric)
    xs = order_values(frame[x_column].dropna())
    hues = order_values(frame[hue_column].dropna()) if hue_column else [NO_HUE]
    by = [x_column] + ([hue_column] if hue_column else [])
    stats = summarize(frame, by, metric, scale)
    shape = (len(hues), len(xs))
    arrays = {name: np.full(shape, np.nan) for name in ("mean", "std", "ci95")}
    count = np.zeros(shape, dtype=int)
    for _, point in stats.iterrows():
        h = hues.index(point[hue_column]) if hue_column else 0
        i = xs.index(point[x_column])
        for name, array in arrays.items():
            array[h, i] = point[name]
        count[h, i] = point["count"]
    return Series(
        label_of(x_column),
        label_of(hue_column) if hue_column else None,
        xs,
        hues,
        arrays["mean"],
        arrays["std"],
        arrays["ci95"],
        count,
        metric,
        unit,
    )


def _decorate(
    ax: Axes, series: Series, title: str, error: str, missing_note: str, baseline: float | None
) -> None:
    ax.set_xlabel(series.x_axis)
    ax.set_ylabel(metric_label(series.metric))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    if series.hue_axis is not None:  # beside the axes, where it cannot cover a bar or a point
        ax.legend(
            title=series.hue_axis,
            fontsize=8,
            title_fontsize=8,
            frameon=False,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
        )
    if not series.replicated:
        notes = ["one seed per point: no error bars"]
    else:
        notes = [ERROR_NOTES[error]] if error != "none" else []
        if error != "none" and (series.count == 1).any():
            notes.append("points of one seed: no error bar")
    if np.isnan(series.mean).any():
        notes.append(missing_note)
    if baseline is not None:  # the number every point is read against
        ax.axhline(baseline, color="0.35", linestyle="--", linewidth=1)
        notes.append(f"dashed: random-init backbone ({format_value(baseline, series.unit)})")
    add_notes(ax.figure, notes)


def plot_curve(series: Series, title: str, error: str = "std", baseline: float | None = None) -> Figure:
    """A line per hue value over x; a log2 x scale for sizes spanning powers of two (as in the papers)."""
    figure = new_figure(6.0, 4.2)
    ax = figure.add_subplot()
    numeric = series.numeric_x
    positions = np.asarray(series.xs, dtype=float) if numeric else np.arange(len(series.xs), dtype=float)
    errors = series.errors(error)
    for h, hue in enumerate(series.hues):
        present = ~np.isnan(series.mean[h])
        if not present.any():  # no point to draw: no empty legend entry either
            continue
        yerr = None if errors is None else errors[h][present]
        ax.errorbar(
            positions[present],
            series.mean[h][present],
            yerr=yerr,
            marker="o",
            capsize=3,
            label=str(hue) if series.hue_axis is not None else None,
        )
    if numeric and positions.min() > 0 and positions.max() / positions.min() >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(positions, [str(x) for x in series.xs])
    ax.minorticks_off()
    _decorate(ax, series, title, error, "points without a finished trial are left out", baseline)
    return figure


def plot_bars(series: Series, title: str, error: str = "std", baseline: float | None = None) -> Figure:
    """Grouped bars: one group per x value, one bar per hue; a missing bar is marked n/a, never drawn as 0."""
    figure = new_figure(max(5.0, 1.0 + 0.35 * len(series.xs) * len(series.hues) + 0.5 * len(series.xs)), 4.2)
    ax = figure.add_subplot()
    width = 0.8 / len(series.hues)
    errors = series.errors(error)
    for h, hue in enumerate(series.hues):
        positions = np.arange(len(series.xs)) - 0.4 + width * (h + 0.5)
        present = ~np.isnan(series.mean[h])
        yerr = None if errors is None else errors[h][present]
        bars = ax.bar(
            positions[present],
            series.mean[h][present],
            width=width * 0.92,
            yerr=yerr,
            capsize=2,
            label=str(hue) if series.hue_axis is not None else None,
        )
        # The value on each bar: bars start at 0, so differences of a point or two are hard to read off.
        ax.bar_label(bars, [format_value(v, series.unit) for v in series.mean[h][present]], fontsize=7)
        for position in positions[~present]:
            ax.text(position, 0, "n/a", ha="center", va="bottom", fontsize=8, color="0.3")
    ax.set_xticks(np.arange(len(series.xs)), [_wrapped(str(x)) for x in series.xs])
    _decorate(ax, series, title, error, "n/a: no finished trial (no bar drawn)", baseline)
    return figure


def _wrapped(label: str, width: int = 12) -> str:
    """A long group label over two or more lines, broken at spaces, so that neighbours do not overlap."""
    return textwrap.fill(label, width, break_long_words=False) if len(label) > width else label


@dataclass
class FigureResult:
    path: Path
    csv_path: Path
    series: Series


def render_series(
    store: Store,
    study: str,
    x: str,
    hue: str | None = None,
    metric: str = "linear_top1",
    kind: str = "curve",
    error: str = "std",
    out: str | Path | None = None,
    where: Mapping[str, str] | None = None,
) -> FigureResult:
    """Draw a curve or bar figure of the study and write it, with its numbers as CSV beside it."""
    if error not in ERRORS:
        raise ConfigError(f"unknown error bars '{error}'; use {', '.join(ERRORS)}")
    path = check_output(out if out is not None else Path("results") / f"{study}-{kind}.png")
    frame = apply_where(load_study(store, study), where or {})
    series = series_data(frame, x, hue, metric)
    title = figure_title(study, frame, metric)
    plot = plot_curve if kind == "curve" else plot_bars
    save_figure(plot(series, title, error, baseline_value(frame, metric)), path, series.to_frame())
    return FigureResult(path, path.with_suffix(".csv"), series)
