"""A comparison's results (the method x seed study `sslab compare` runs), read from the store: mean ± std
per method, paired differences over seeds with a 95% confidence interval and a paired t-test, learning curves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.table import Table

from sslab.errors import SslabError
from sslab.metrics import (
    KNN_TOP1,
    LINEAR_TOP1,
)
from sslab.report.data import metric_scale
from sslab.report.figures import save_figure
from sslab.report.stats import describe, paired_difference
from sslab.report.training_curves import learning_curve_frame, plot_learning_curves
from sslab.store import Store

COMPARED_METRICS = (LINEAR_TOP1.name, KNN_TOP1.name)


@dataclass
class Comparison:
    study: str
    methods: list[str]
    seeds: list[int]
    frame: pd.DataFrame  # the comparison's trials (study_frame rows), any status

    @property
    def done(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] == "done"]


def load_comparison(store: Store, study: str) -> Comparison:
    """The recorded comparison `study`; an error when none of its trials has finished."""
    row = store.study(study)
    if row is None:
        raise SslabError(f"no comparison named '{study}' in {store.url}; run `sslab compare` first")
    spec = json.loads(row.spec_json)
    methods = list(spec.get("axes", {}).get("method", []))
    seeds = list(spec.get("seeds", []))
    frame = store.study_frame(study)
    comparison = Comparison(study, methods, seeds, frame)
    if comparison.done.empty:
        raise SslabError(f"none of the {len(frame)} trials of {study} has finished")
    return comparison


# --- numbers ----------------------------------------------------------------------------------------------


def method_summary(comparison: Comparison) -> pd.DataFrame:
    """Per method: finished trials, mean and std of the accuracies, wall time, images/s, collapsed count."""
    rows = []
    for method in comparison.methods:
        trials = comparison.frame[comparison.frame["axis.method"] == method]
        done = trials[trials["status"] == "done"]
        row: dict[str, Any] = {"method": method, "done": len(done), "trials": len(trials)}
        for metric in (*COMPARED_METRICS, "wall_time_s", "images_per_s"):
            values = pd.to_numeric(done.get(metric, pd.Series(dtype=float)), errors="coerce").tolist()
            row[f"{metric}_mean"], row[f"{metric}_std"] = describe(values)[:2]
        row["collapsed"] = int(done["collapsed"].eq(True).sum())
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairedDifference:
    """metric(a) - metric(b) over the seeds where both finished, in the metric's display unit."""

    a: str
    b: str
    metric: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    t: float
    p: float


def paired_differences(comparison: Comparison, metric: str) -> list[PairedDifference]:
    scale = metric_scale(metric)[0]
    done = comparison.done
    by_seed = {
        method: dict(
            zip(rows["axis.seed"], pd.to_numeric(rows[metric], errors="coerce") * scale, strict=True)
        )
        for method, rows in done.groupby("axis.method")
        if metric in rows
    }
    results = []
    for a, b in combinations(comparison.methods, 2):
        seeds = [s for s in comparison.seeds if s in by_seed.get(a, {}) and s in by_seed.get(b, {})]
        seeds = [s for s in seeds if not (math.isnan(by_seed[a][s]) or math.isnan(by_seed[b][s]))]
        mean, low, high, t, p, n = paired_difference(
            [by_seed[a][s] for s in seeds], [by_seed[b][s] for s in seeds]
        )
        results.append(PairedDifference(a, b, metric, n, mean, low, high, t, p))
    return results


# --- presentation -----------------------------------------------------------------------------------------


def summary_table(comparison: Comparison) -> Table:
    c: Any = comparison.done.iloc[0]
    table = Table(
        title=f"{comparison.study}: {c.dataset} · {c.backbone} · {c.epochs} epochs · batch {c.batch_size}",
        caption="mean ± std over seeds; linear / kNN: test top-1 accuracy in %; wall time in seconds",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("method", "done", "linear", "kNN", "wall time", "images/s", "collapsed"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for _, row in method_summary(comparison).iterrows():
        table.add_row(
            row["method"],
            f"{row['done']}/{row['trials']}",
            _pm(row["linear_top1_mean"] * 100, row["linear_top1_std"] * 100, "%"),
            _pm(row["knn_top1_mean"] * 100, row["knn_top1_std"] * 100, "%"),
            _pm(row["wall_time_s_mean"], row["wall_time_s_std"], "s"),
            _pm(row["images_per_s_mean"], row["images_per_s_std"], "/s"),
            f"{row['collapsed']}/{row['done']}",
        )
    return table


def pairs_table(comparison: Comparison) -> Table:
    table = Table(
        title="paired differences (first - second), over seeds",
        caption="percentage points; 95% CI from the t distribution; p: two-sided paired t-test",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("pair", "metric", "seeds", "mean diff", "95% CI", "p"):
        table.add_column(column, justify="left" if column in ("pair", "metric") else "right", no_wrap=True)
    for metric in COMPARED_METRICS:
        for d in paired_differences(comparison, metric):
            ci = "needs ≥ 2 seeds" if math.isnan(d.ci_low) else f"[{d.ci_low:+.2f}, {d.ci_high:+.2f}]"
            p = "" if math.isnan(d.p) else f"{d.p:.3g}"
            mean = "" if math.isnan(d.mean) else f"{d.mean:+.2f}"
            table.add_row(f"{d.a} - {d.b}", metric, str(d.n), mean, ci, p)
    return table


def _pm(mean: float, std: float, unit: str) -> str:
    """mean ± std: accuracies (%) and seconds with one decimal, rates as whole numbers."""
    if math.isnan(mean):
        return "–"
    digits = 0 if unit == "/s" else 1
    return f"{mean:,.{digits}f}" + ("" if math.isnan(std) else f" ± {std:,.{digits}f}")


def render_curves(store: Store, comparison: Comparison, out: str | Path | None = None) -> Path | None:
    """Save the comparison's learning curves (and their numbers as CSV beside them); None if none recorded."""
    title = f"{comparison.study}: per-epoch training metrics"
    figure = plot_learning_curves(store, comparison.frame, ["axis.method"], title)
    if figure is None:
        return None
    path = out if out is not None else Path("results") / f"{comparison.study}-curves.png"
    return save_figure(figure, path, learning_curve_frame(store, comparison.frame, ["axis.method"]))
