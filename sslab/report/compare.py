"""Methods compared on one matched budget: run what is missing, then mean ± std per method, paired
differences over seeds with a 95% confidence interval and a paired t-test, and learning curves."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich import box
from rich.table import Table

from sslab.config import TrialConfig, coerce_value, from_mapping
from sslab.errors import ConfigError, SslabError
from sslab.report.data import describe, metric_scale, plain_value, t_two_sided_p
from sslab.report.figures import add_notes, new_figure, save_figure
from sslab.store import Store

BUDGET_FIELDS = ("dataset", "backbone", "epochs", "batch_size", "image_size", "train_subset")
SET_BY_COMPARE = ("method", "seed")
CURVE_METRICS = ("loss", "knn_top1", "collapse_ratio")  # per-epoch metrics drawn when recorded
COMPARED_METRICS = ("linear_top1", "knn_top1")


@dataclass
class Comparison:
    study: str
    methods: list[str]
    seeds: list[int]
    configs: dict[tuple[str, int], TrialConfig]
    frame: pd.DataFrame  # the comparison's trials (study_frame rows), any status
    ran: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def done(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] == "done"]


def study_name(methods: Sequence[str]) -> str:
    return "compare-" + "-".join(methods)


def compare_configs(
    methods: Sequence[str], seeds: Sequence[int], overrides: Mapping[str, Any]
) -> dict[tuple[str, int], TrialConfig]:
    """One config per method x seed; the budget fields are equal for every method, whatever its defaults."""
    from sslab.methods import METHODS
    from sslab.runner import preflight

    if len(methods) < 2:
        raise ConfigError("compare needs two or more methods, e.g. `sslab compare simclr byol`")
    if len(set(methods)) < len(methods):
        raise ConfigError(f"a method is named twice: {' '.join(methods)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; valid methods: {', '.join(METHODS)}")
    if not seeds:
        raise ConfigError("--seeds must be at least 1")
    fixed = [k for k in SET_BY_COMPARE if k in overrides]
    if fixed:
        raise ConfigError(
            f"{', '.join(fixed)} cannot be set: compare varies them (name methods, use --seeds)"
        )
    budget = {name: overrides.get(name, getattr(TrialConfig, name)) for name in BUDGET_FIELDS}
    configs = {}
    for method in methods:
        for seed in seeds:
            config = from_mapping({**overrides, **budget, "method": method, "seed": seed}, source="compare")
            preflight(config)
            configs[(method, seed)] = config
    return configs


def run_compare(
    store: Store,
    methods: Sequence[str],
    seeds: int = 3,
    overrides: Mapping[str, Any] | None = None,
    run: bool = True,
    study: str | None = None,
    before_trial: Callable[[str, int, TrialConfig], Any] | None = None,
) -> Comparison:
    """Record the comparison as a study (axes method and seed), train its missing trials unless `run` is
    False, and return its trials. A trial that fails (e.g. a non-finite loss) is recorded and reported; the
    others still run."""
    from sslab.runner import run_trial
    from sslab.train import TrialFailed

    overrides = {k: coerce_value(k, v) for k, v in (overrides or {}).items()}
    seed_list = list(range(seeds))
    configs = compare_configs(methods, seed_list, overrides)
    name = study or study_name(methods)
    _check_same_budget(store, name, overrides)
    if not run and not any(_is_done(store, c) for c in configs.values()):
        raise SslabError(f"none of the {len(configs)} trials of {name} has finished; run it without --no-run")
    spec = {"kind": "compare", "methods": list(methods), "seeds": seed_list, "set": overrides}
    store.register_study(name, spec)
    for (method, seed), config in configs.items():
        store.add_study_trial(name, config.hash(), {"method": method, "seed": seed})
    ran, failures = 0, []
    for (method, seed), config in configs.items():
        if not run or _is_done(store, config):
            continue
        if before_trial is not None:
            before_trial(method, seed, config)
        ran += 1
        try:
            run_trial(config, store)
        except TrialFailed as exc:
            failures.append(f"{method} seed {seed}: {exc}")
        except SslabError:
            raise
        except Exception as exc:  # recorded as failed by run_trial; the other trials still run
            failures.append(
                f"{method} seed {seed}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            )
    frame = store.study_frame(name)
    frame = frame[frame["hash"].isin({c.hash() for c in configs.values()})].reset_index(drop=True)
    comparison = Comparison(name, list(methods), seed_list, configs, frame, ran, failures)
    if comparison.done.empty:
        raise SslabError(f"none of the {len(configs)} trials of {name} has finished: {'; '.join(failures)}")
    return comparison


def _is_done(store: Store, config: TrialConfig) -> bool:
    row = store.find(config.hash())
    return row is not None and row.status == "done"


def _check_same_budget(store: Store, name: str, overrides: Mapping[str, Any]) -> None:
    for row in store.studies():
        if row.name == name:
            recorded = json.loads(row.spec_json).get("set", {})
            if recorded != json.loads(json.dumps(dict(overrides))):
                raise ConfigError(
                    f"study {name} was recorded with --set {_assignments(recorded)}; repeat those settings "
                    "or name a new study with --study NAME"
                )


def _assignments(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(values.items())) or "(none)"


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


def paired_difference(
    a: Sequence[float], b: Sequence[float]
) -> tuple[float, float, float, float, float, int]:
    """(mean, ci_low, ci_high, t, two-sided p, n) of the paired differences a - b (NaN where undefined)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std, n, half = describe(diffs)
    if n < 2:
        return mean, math.nan, math.nan, math.nan, math.nan, n
    if std == 0:  # identical differences on every seed: t is 0 or infinite
        return mean, mean, mean, 0.0 if mean == 0 else math.copysign(math.inf, mean), float(mean == 0), n
    t = mean / (std / math.sqrt(n))
    return mean, mean - half, mean + half, t, t_two_sided_p(t, n - 1), n


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
    c = comparison.configs[(comparison.methods[0], comparison.seeds[0])]
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
    """One panel per recorded per-epoch metric (loss, kNN top-1, collapse ratio), a line per group."""
    curves = learning_curve_frame(store, frame, by)
    if curves.empty:
        return None
    metrics = [m for m in CURVE_METRICS if m in set(curves["metric"])]
    figure = new_figure(4.2 * len(metrics) + 2.2, 3.8)  # + the legend beside the panels
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
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
    axes[-1].legend(  # beside the last panel, where it covers no line
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


def render_curves(store: Store, comparison: Comparison, out: str | Path | None = None) -> Path | None:
    """Save the comparison's learning curves (and their numbers as CSV beside them); None if none recorded."""
    title = f"{comparison.study}: per-epoch training metrics"
    figure = plot_learning_curves(store, comparison.frame, ["axis.method"], title)
    if figure is None:
        return None
    path = out if out is not None else Path("results") / f"{comparison.study}-curves.png"
    return save_figure(figure, path, learning_curve_frame(store, comparison.frame, ["axis.method"]))
