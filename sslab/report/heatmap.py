"""A two-axis heatmap like SimCLR Fig. 5: rows = first transformation, columns = second, row averages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sslab.errors import ConfigError
from sslab.report.data import (
    apply_where,
    baseline_value,
    check_metric,
    check_single_valued,
    column_for,
    figure_title,
    fill_axes,
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

AVERAGE = "Average"
AXIS_TITLES = {"first": "1st transformation", "second": "2nd transformation"}
CMAP = "YlGnBu"


@dataclass
class Grid:
    """Means over seeds on a rows x cols grid (NaN where no trial finished) and each row's average."""

    row_axis: str
    col_axis: str
    rows: list
    cols: list
    mean: np.ndarray  # (R, C)
    std: np.ndarray  # (R, C), NaN with fewer than two seeds
    count: np.ndarray  # (R, C) finished trials per cell
    metric: str
    unit: str

    @property
    def average(self) -> np.ndarray:
        """Row mean over the cells that have a value; NaN for a row without any."""  # (R,)
        has = ~np.isnan(self.mean)
        total = np.where(has, self.mean, 0.0).sum(axis=1)
        cells = has.sum(axis=1)
        return np.divide(total, cells, out=np.full(len(self.rows), np.nan), where=cells > 0)

    def to_frame(self) -> pd.DataFrame:
        """Exactly the plotted numbers, one row per cell, the Average column last."""
        records = []
        for i, row in enumerate(self.rows):
            for j, col in enumerate(self.cols):
                records.append((row, col, self.mean[i, j], self.std[i, j], int(self.count[i, j])))
            records.append((row, AVERAGE, self.average[i], np.nan, int((~np.isnan(self.mean[i])).sum())))
        frame = pd.DataFrame(records, columns=[self.row_axis, self.col_axis, "mean", "std", "count"])
        frame.insert(2, "metric", self.metric)
        frame.insert(3, "unit", self.unit)
        return frame


def heatmap_grid(frame: pd.DataFrame, row: str, col: str, metric: str) -> Grid:
    row_column, col_column = column_for(frame, row), column_for(frame, col)
    if row_column == col_column:
        raise ConfigError("rows and columns must be two different axes")
    check_metric(frame, metric)
    check_single_valued(frame, [row_column, col_column])
    scale, unit = metric_scale(metric)
    rows = order_values(frame[row_column].dropna())  # every trial of the study, so missing ones show
    cols = order_values(frame[col_column].dropna())
    if all(isinstance(v, str) for v in rows + cols) and set(rows) & set(cols):
        rows = cols = order_values(rows + cols)  # same vocabulary (e.g. ops): a square grid
    stats = summarize(frame, [row_column, col_column], metric, scale)
    shape = (len(rows), len(cols))
    mean, std, count = np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, dtype=int)
    for _, cell in stats.iterrows():
        i, j = rows.index(cell[row_column]), cols.index(cell[col_column])
        mean[i, j], std[i, j], count[i, j] = cell["mean"], cell["std"], cell["count"]
    return Grid(label_of(row_column), label_of(col_column), rows, cols, mean, std, count, metric, unit)


def plot_heatmap(grid: Grid, title: str, baseline: float | None = None) -> Figure:
    """The grid with the Average column after a gap; blank hatched cells where no trial finished.

    `baseline`: the metric of the untrained backbone (already in the grid's unit), noted under the figure.
    """
    values = np.column_stack([grid.mean, grid.average])  # (R, C + 1)
    n_rows, n_cols = values.shape
    figure = new_figure(2.2 + 0.8 * n_cols, 1.9 + 0.6 * n_rows)
    ax = figure.add_subplot()
    ax.set_label("heatmap")
    finite = values[~np.isnan(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=_colormap(), vmin=low, vmax=high)
    for i in range(n_rows):
        for j in range(n_cols):
            value = values[i, j]
            if np.isnan(value):
                ax.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.8", lw=0)
                )
                continue
            text = format_value(value, grid.unit)
            if j < len(grid.cols) and grid.count[i, j] > 1:
                text += f"\n±{format_value(grid.std[i, j], grid.unit)}"
            shade = (value - low) / (high - low) if high > low else 0.0  # white text on dark cells
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, color="white" if shade > 0.6 else "black"
            )
    ax.axvline(len(grid.cols) - 0.5, color="white", lw=6)  # sets the Average column apart, as in the paper
    ax.set_xticks(range(n_cols), [str(c) for c in grid.cols] + [AVERAGE])
    ax.set_yticks(range(n_rows), [str(r) for r in grid.rows])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if any(len(str(c)) > 7 for c in grid.cols):
        for label in ax.get_xticklabels():
            label.set_rotation(35)
            label.set_horizontalalignment("right")
    ax.set_xlabel(AXIS_TITLES.get(grid.col_axis, grid.col_axis))
    ax.set_ylabel(AXIS_TITLES.get(grid.row_axis, grid.row_axis))
    colorbar = figure.colorbar(image, ax=ax, shrink=0.85)
    colorbar.set_label(metric_label(grid.metric))
    ax.set_title(title, fontsize=10)
    notes = _notes(grid)
    if baseline is not None:
        notes.append(f"random-init backbone: {format_value(baseline, grid.unit)}")
    add_notes(figure, notes, missing=bool(np.isnan(grid.mean).any()))
    return figure


def _colormap() -> Colormap:
    return colormaps[CMAP].with_extremes(bad="white")


def _notes(grid: Grid) -> list[str]:
    seeds = sorted({int(n) for n in grid.count[grid.count > 0]})
    notes = []
    if grid.rows == grid.cols and grid.row_axis == "first":
        notes.append("diagonal: single transformation")
    if seeds and seeds[-1] > 1:
        notes.append(f"cell: mean ± std over {'/'.join(map(str, seeds))} seeds")
    notes.append(f"{AVERAGE}: mean of the row's cells that have a value")
    return notes


@dataclass
class HeatmapResult:
    path: Path
    csv_path: Path
    grid: Grid


def render_heatmap(
    store: Store,
    study: str,
    metric: str = "linear_top1",
    rows: str | None = None,
    cols: str | None = None,
    out: str | Path | None = None,
    where: Mapping[str, str] | None = None,
) -> HeatmapResult:
    """Read the study from the store, draw its heatmap and write it (and its numbers as CSV beside it)."""
    path = check_output(out if out is not None else Path("results") / f"{study}.png")
    frame = apply_where(load_study(store, study), where or {})
    rows, cols = fill_axes(frame, [rows, cols])
    grid = heatmap_grid(frame, rows, cols, metric)
    figure = plot_heatmap(grid, figure_title(study, frame, metric), baseline_value(frame, metric))
    save_figure(figure, path, grid.to_frame())
    return HeatmapResult(path, path.with_suffix(".csv"), grid)
