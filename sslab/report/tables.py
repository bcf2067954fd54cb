"""Tables of a study (rows x columns of two axes, mean ± std over seeds) in rich, Markdown, LaTeX and CSV."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

from sslab.errors import ConfigError
from sslab.report.curves import Series, series_data
from sslab.report.data import apply_where, figure_title, format_value, load_study, metric_label
from sslab.store import Store

FORMATS = ("table", "markdown", "latex", "csv")
DASH = "–"
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
}


@dataclass
class PivotTable:
    """mean ± std over seeds of one metric: a row per value of one axis, a column per value of another."""

    title: str
    row_axis: str
    col_axis: str | None
    rows: list
    cols: list
    mean: np.ndarray  # (R, C)
    std: np.ndarray  # (R, C)
    count: np.ndarray  # (R, C)
    ci95: np.ndarray  # (R, C)
    metric: str
    unit: str

    @classmethod
    def from_series(cls, series: Series, title: str) -> PivotTable:
        cols = series.hues if series.hue_axis is not None else [metric_label(series.metric)]
        return cls(
            title,
            series.x_axis,
            series.hue_axis,
            series.xs,
            cols,
            series.mean.T,
            series.std.T,
            series.count.T,
            series.ci95.T,
            series.metric,
            series.unit,
        )

    def cell(self, i: int, j: int, pm: str = " ± ") -> str:
        if np.isnan(self.mean[i, j]):
            return ""
        text = format_value(self.mean[i, j], self.unit)
        if self.count[i, j] > 1:
            text += pm + format_value(self.std[i, j], self.unit)
        return text

    @property
    def corner(self) -> str:
        return f"{self.row_axis} \\ {self.col_axis}" if self.col_axis else self.row_axis

    @property
    def caption(self) -> str:
        seeds = sorted({int(n) for n in self.count[self.count > 0].ravel()})
        spread = (
            f"mean ± std over {'/'.join(map(str, seeds))} seeds" if seeds and seeds[-1] > 1 else "one seed"
        )
        return f"{spread}; {DASH}: no finished trial"


def pivot_table(frame: pd.DataFrame, rows: str, cols: str | None, metric: str, title: str) -> PivotTable:
    return PivotTable.from_series(series_data(frame, rows, cols, metric), title)


def to_rich(table: PivotTable) -> Table:
    out = Table(title=table.title.replace("\n", " — "), caption=table.caption, show_header=True)
    out.add_column(escape(table.corner))
    for col in table.cols:
        out.add_column(escape(str(col)), justify="right")
    for i, row in enumerate(table.rows):
        out.add_row(
            escape(str(row)), *(table.cell(i, j) or f"[dim]{DASH}[/]" for j in range(len(table.cols)))
        )
    return out


def to_markdown(table: PivotTable) -> str:
    header = [table.corner, *map(str, table.cols)]
    body = [
        [str(row), *(table.cell(i, j) or DASH for j in range(len(table.cols)))]
        for i, row in enumerate(table.rows)
    ]
    title = table.title.replace("\n", " — ")
    return f"**{_md(title)}**\n\n{markdown_rows(header, body)}\n\n{_md(table.caption)}\n"


def to_latex(table: PivotTable) -> str:
    """A booktabs table; the column axis named over its values with a \\cmidrule."""
    n = len(table.cols)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\begin{{tabular}}{{l{'r' * n}}}",
        r"\toprule",
    ]
    if table.col_axis is not None:
        lines.append(rf" & \multicolumn{{{n}}}{{c}}{{{latex_escape(table.col_axis)}}} \\")
        lines.append(rf"\cmidrule(lr){{2-{n + 1}}}")
    lines.append(
        " & ".join([latex_escape(table.row_axis), *(latex_escape(str(c)) for c in table.cols)]) + r" \\"
    )
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        cells = [table.cell(i, j, r" $\pm$ ") or "--" for j in range(n)]
        lines.append(" & ".join([latex_escape(str(row)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = latex_escape(f"{table.title.replace(chr(10), '. ')}. {table.caption}.")
    lines += [rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: PivotTable) -> str:
    """Tidy numbers (one row per cell) rather than formatted strings, for further analysis."""
    records = []
    for i, row in enumerate(table.rows):
        for j, col in enumerate(table.cols):
            record: dict[str, Any] = {table.row_axis: row}
            if table.col_axis is not None:
                record[table.col_axis] = col
            record.update(metric=table.metric, unit=table.unit, mean=table.mean[i, j], std=table.std[i, j])
            record.update(count=int(table.count[i, j]), ci95=table.ci95[i, j])
            records.append(record)
    return pd.DataFrame(records).to_csv(index=False, float_format="%.7g")  # float32 metrics: no float noise


def render_table(
    store: Store,
    study: str,
    rows: str,
    cols: str | None = None,
    metric: str = "linear_top1",
    format: str = "table",
    where: Mapping[str, str] | None = None,
) -> Table | str:
    """The study's table in the asked format: a rich Table for the terminal, else text."""
    if format not in FORMATS:
        raise ConfigError(f"unknown format '{format}'; use {', '.join(FORMATS)}")
    frame = apply_where(load_study(store, study), where or {})
    table = pivot_table(frame, rows, cols, metric, figure_title(study, frame, metric))
    if format == "table":
        return to_rich(table)
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}[format](table)


# --- any frame (e.g. `sslab results`) ---------------------------------------------------------------------


def summary_view(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The given columns that exist, with a study's `axis.*` columns after the trial's id and hash."""
    axes = [c for c in frame.columns if str(c).startswith("axis.")]
    head = [c for c in columns if c in ("id", "hash")]
    order = [*head, *axes, *(c for c in columns if c not in head)]
    return frame[[c for c in order if c in frame.columns]]


def plain_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) <= 1 else f"{value:,.1f}"
    return str(value)


def markdown_rows(header: list[str], body: list[list[str]], right: list[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table; by default the first column left-aligned, the others right."""
    right = right if right is not None else [False] + [True] * (len(header) - 1)
    align = "| " + " | ".join("--:" if r else "---" for r in right) + " |"
    return "\n".join([_md_line(header), align, *(_md_line(row) for row in body)])


def _md_line(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"


def frame_markdown(frame: pd.DataFrame) -> str:
    body = [[plain_cell(v) for v in row] for row in frame.itertuples(index=False)]
    right = [frame[c].dtype.kind in "if" for c in frame.columns]
    return markdown_rows([str(c) for c in frame.columns], body, right) + "\n"


def frame_latex(frame: pd.DataFrame) -> str:
    """A booktabs tabular of any frame, every cell escaped."""
    kinds = ["r" if frame[c].dtype.kind in "if" else "l" for c in frame.columns]
    lines = [rf"\begin{{tabular}}{{{''.join(kinds)}}}", r"\toprule"]
    lines.append(" & ".join(latex_escape(str(c)) for c in frame.columns) + r" \\")
    lines.append(r"\midrule")
    for row in frame.itertuples(index=False):
        lines.append(" & ".join(latex_escape(plain_cell(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text.replace(" · ", ", "))


def _md(text: str) -> str:
    return text.replace("|", r"\|")
