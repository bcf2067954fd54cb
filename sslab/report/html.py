"""One self-contained HTML report of a study: figures embedded as PNG data URIs, tables, every trial's config
and provenance, failures with their reasons. No scripts, fonts or other external assets: it opens offline."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sqlalchemy.engine import make_url

import sslab
from sslab.errors import ConfigError, SslabError
from sslab.metrics import BASELINE_PREFIX, lookup
from sslab.report.curves import plot_bars, plot_curve, series_data
from sslab.report.data import (
    axis_names,
    baseline_value,
    check_metric,
    figure_title,
    load_study,
    metric_label,
    plain_value,
)
from sslab.report.figures import png_data_uri
from sslab.report.heatmap import heatmap_grid, plot_heatmap
from sslab.report.tables import DASH, PivotTable, pivot_table, plain_cell
from sslab.report.training_curves import plot_learning_curves
from sslab.store import Store

MAX_CURVE_GROUPS = 12  # learning curves of more configurations than this are unreadable in one panel
TRIAL_METRICS = ("linear_top1", "knn_top1", "baseline_linear_top1", "images_per_s")
# Shown in the trials table when a study recorded them (fine-tuning, kNN sweep, label-free metrics).
EVALUATION_METRICS = ("knn_sweep_top1", "rankme", "alignment", "uniformity")


def _is_evaluation(column: str) -> bool:
    metric = lookup(column)
    return metric is not None and metric.labelled and not column.startswith(BASELINE_PREFIX)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { padding: .25em .6em; border-bottom: 1px solid #e4e4e4; text-align: right; vertical-align: top; }
th { border-bottom: 2px solid #888; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; } .missing { color: #999; } .failed { color: #b00020; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: .85em; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .8em; }
details summary { cursor: pointer; color: #345; }
"""


def build_report(store: Store, study: str, metric: str = "linear_top1") -> str:
    """The report's HTML text."""
    frame = load_study(store, study)
    check_metric(frame, metric)
    provenance = {row.config_hash: row for row in store.trials()}
    sections = [
        _summary(store, study, frame),
        _figures(store, study, frame, metric),
        _tables(study, frame, metric),
        _problems(frame),
        _trials(frame, provenance, metric),
    ]
    title = f"sslab report: {study}"
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n" + "\n".join(s for s in sections if s) + "\n</body>\n</html>\n"
    )


def write_report(
    store: Store, study: str, metric: str = "linear_top1", out: str | Path | None = None
) -> Path:
    path = Path(out) if out is not None else Path("results") / f"{study}.html"
    text = build_report(store, study, metric)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SslabError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def _summary(store: Store, study: str, frame: pd.DataFrame) -> str:
    counts = frame["status"].value_counts()
    status = ", ".join(f"{n} {escape(str(s))}" for s, n in counts.items())
    spec = next((row.spec_json for row in store.studies() if row.name == study), "{}")
    url = make_url(store.url).render_as_string(hide_password=True)
    axes = ", ".join(axis_names(frame, with_seed=True)) or "none"
    return (
        "<h2>Study</h2>\n<table>\n"
        f"<tr><td>trials</td><td class='text'>{len(frame)}: {status}</td></tr>\n"
        f"<tr><td>axes</td><td class='text'>{escape(axes)}</td></tr>\n"
        f"<tr><td>results store</td><td class='text'>{escape(url)}</td></tr>\n"
        f"<tr><td>generated</td><td class='text'>{datetime.now(UTC):%Y-%m-%d %H:%M} UTC by sslab "
        f"{escape(sslab.__version__)}</td></tr>\n</table>\n"
        f"<details><summary>study spec</summary><pre>{escape(json.dumps(json.loads(spec), indent=2))}</pre>"
        "</details>"
    )


def _figure_html(figure: Figure, caption: str) -> str:
    return (
        f"<figure><img src='{png_data_uri(figure)}' alt='{escape(caption, quote=True)}'>"
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _plot_axes(frame: pd.DataFrame) -> list[str]:
    axes = axis_names(frame)
    return ["first", "second"] if {"first", "second"} <= set(axes) else axes


def _figures(store: Store, study: str, frame: pd.DataFrame, metric: str) -> str:
    axes = _plot_axes(frame)
    title, baseline = figure_title(study, frame, metric), baseline_value(frame, metric)
    parts = ["<h2>Figures</h2>"]
    try:
        if len(axes) == 2:
            grid = heatmap_grid(frame, axes[0], axes[1], metric)
            parts.append(
                _figure_html(plot_heatmap(grid, title, baseline), f"{metric} by {axes[0]} and {axes[1]}")
            )
        if len(axes) in (1, 2) and axes != ["first", "second"]:
            x, hue = (axes[0], axes[1] if len(axes) == 2 else None)
            series = series_data(frame, x, hue, metric)
            plot = plot_curve if series.numeric_x and len(series.xs) > 2 else plot_bars
            parts.append(
                _figure_html(
                    plot(series, title, baseline=baseline),
                    f"{metric} over {x}" + (f" by {hue}" if hue else ""),
                )
            )
    except ConfigError as exc:
        parts.append(f"<p class='note'>No figure: {escape(str(exc))}.</p>")
    if len(axes) > 2:
        parts.append(
            f"<p class='note'>The study varies {len(axes)} axes ({escape(', '.join(axes))}); draw two of "
            "them with <code>sslab report heatmap STUDY --rows A --cols B --where C=VALUE</code>.</p>"
        )
    groups = [f"axis.{a}" for a in axis_names(frame)]
    done = frame[frame["status"] == "done"]
    if (done.groupby(groups).ngroups if groups else 1) <= MAX_CURVE_GROUPS:
        curves = plot_learning_curves(store, frame, groups, f"{study}: training curves")
        if curves is not None:
            parts.append(_figure_html(curves, "per-epoch training metrics, mean ± std over seeds"))
    return "\n".join(parts)


def _tables(study: str, frame: pd.DataFrame, metric: str) -> str:
    axes = _plot_axes(frame)
    if not axes:
        return ""
    try:
        table = pivot_table(frame, axes[0], axes[1] if len(axes) == 2 else None, metric, study)
    except ConfigError as exc:
        return f"<h2>Table</h2>\n<p class='note'>No table: {escape(str(exc))}.</p>"
    return f"<h2>Table: {escape(metric_label(metric))}</h2>\n{pivot_html(table)}"


def pivot_html(table: PivotTable) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in [table.corner, *table.cols])
    rows = []
    for i, row in enumerate(table.rows):
        cells = [
            f"<td>{escape(table.cell(i, j))}</td>" if table.cell(i, j) else f"<td class='missing'>{DASH}</td>"
            for j in range(len(table.cols))
        ]
        rows.append(f"<tr><td>{escape(str(row))}</td>{''.join(cells)}</tr>")
    body = "\n".join(rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n<p class='note'>{escape(table.caption)}</p>"


def _problems(frame: pd.DataFrame) -> str:
    unfinished = frame[frame["status"] != "done"]
    if unfinished.empty:
        return "<h2>Failed and unfinished trials</h2>\n<p class='note'>None: every trial finished.</p>"
    axes = [c for c in frame.columns if str(c).startswith("axis.")]
    head = "".join(f"<th>{escape(h)}</th>" for h in ["trial", "status", *[a[5:] for a in axes], "reason"])
    rows = []
    for _, row in unfinished.iterrows():
        reason = row.get("reason")
        reason = (
            reason
            if isinstance(reason, str) and reason
            else "not run yet"
            if row["status"] == "pending"
            else ""
        )
        cells = [row["hash"], row["status"], *[plain_value(row[a]) for a in axes], reason]
        rows.append(
            "<tr class='failed'>"
            + "".join(f"<td class='text'>{escape(str(c))}</td>" for c in cells)
            + "</tr>"
        )
    return (
        "<h2>Failed and unfinished trials</h2>\n<table>\n<tr>"
        + head
        + "</tr>\n"
        + "\n".join(rows)
        + "\n</table>"
    )


def _trials(frame: pd.DataFrame, provenance: dict, metric: str) -> str:
    axes = [c for c in frame.columns if str(c).startswith("axis.")]
    evaluations = [c for c in frame.columns if str(c) in EVALUATION_METRICS or _is_evaluation(str(c))]
    metrics = list(dict.fromkeys([metric, *TRIAL_METRICS, *evaluations]))
    columns = ["trial", "status", *[a[5:] for a in axes], *metrics, "collapsed", "wall time (s)"]
    columns += ["device", "torch", "sslab", "commit", "host", "config"]
    rows = []
    for _, row in frame.iterrows():
        trial = provenance.get(row["hash"])
        values = [row["hash"], row["status"], *[plain_value(row[a]) for a in axes]]
        values += [row.get(m, np.nan) for m in metrics]
        values += [row.get("collapsed"), row.get("wall_time_s")]
        cells = [f"<td class='text'>{escape(plain_cell(v))}</td>" for v in values]
        if trial is None:
            cells += ["<td class='missing'>–</td>"] * 6
        else:
            for value in (
                trial.device,
                trial.torch_version,
                trial.sslab_version,
                trial.git_commit,
                trial.hostname,
            ):
                cells.append(f"<td class='text'>{escape(str(value) if value else DASH)}</td>")
            config = escape(json.dumps(trial.config, indent=1, sort_keys=True))
            cells.append(
                f"<td class='text'><details><summary>config</summary><pre>{config}</pre></details></td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    return (
        "<h2>Trials</h2>\n<p class='note'>Every trial of the study with its final metrics (as stored, "
        "accuracies as fractions), provenance and full config.</p>\n"
        f"<div style='overflow-x:auto'><table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table></div>"
    )
