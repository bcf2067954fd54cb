"""Reports read from a store filled with known values: the plotted and tabulated numbers are its means."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from typer.testing import CliRunner

from sslab.cli import app
from sslab.config import TrialConfig, from_mapping
from sslab.errors import ConfigError, SslabError
from sslab.report.curves import Series, plot_bars, plot_curve, series_data
from sslab.report.data import apply_where, baseline_value, figure_title, load_study
from sslab.report.heatmap import heatmap_grid, plot_heatmap, render_heatmap
from sslab.report.stats import describe, t_quantile, t_two_sided_p
from sslab.store import Provenance, Store

runner = CliRunner()
PROVENANCE = Provenance("cpu", "2.14.1", "0.1.0", "abc1234", "host")
OPS = ["crop", "color", "blur", "cutout"]  # deliberately not in SimCLR Fig. 5 order
SEEDS = [0, 1, 2]
MISSING = {("blur", "cutout"), ("cutout", "blur")}  # never run: must be blank
FAILED = ("color", "blur")  # seed 0 failed: its cell averages seeds 1 and 2 only


def pair_value(first: str, second: str, seed: int) -> float:
    return 0.30 + 0.05 * OPS.index(first) + 0.02 * OPS.index(second) + 0.01 * seed


def add_trial(store: Store, config: TrialConfig, metrics: dict[str, float], status: str = "done") -> int:
    trial_id = store.begin_trial(config, PROVENANCE)
    for epoch in (1, 2):
        store.log_metrics(trial_id, {"loss": 5.0 - epoch - 0.1 * config.seed}, epoch=epoch)
    if status == "done":
        store.log_metrics(trial_id, metrics)
        store.finish_trial(trial_id, "done", collapsed=False, wall_time_s=10.0 + config.seed)
    else:
        store.finish_trial(trial_id, status, reason="loss is nan at epoch 2", wall_time_s=3.0)
    return trial_id


def fill_aug_pairs(store: Store) -> None:
    """An `aug-pairs` study over OPS x OPS x SEEDS with missing, failed and pending trials."""
    store.register_study("aug-pairs", {"axes": {"first": OPS, "second": OPS}, "seeds": SEEDS})
    for first in OPS:
        for second in OPS:
            if (first, second) in MISSING:
                continue
            for seed in SEEDS:
                config = from_mapping(dict(aug1=first, aug2=second, seed=seed, epochs=2, dataset="synthetic"))
                store.add_study_trial(
                    "aug-pairs", config.hash(), {"first": first, "second": second, "seed": seed}
                )
                value = pair_value(first, second, seed)
                failed = (first, second) == FAILED and seed == 0
                add_trial(
                    store,
                    config,
                    {
                        "linear_top1": value,
                        "knn_top1": value - 0.1,
                        "baseline_linear_top1": 0.2 + 0.01 * seed,
                    },
                    "failed" if failed else "done",
                )
    pending = from_mapping(dict(aug1="blur", aug2="cutout", seed=0, epochs=2, dataset="synthetic"))
    store.add_study_trial("aug-pairs", pending.hash(), {"first": "blur", "second": "cutout", "seed": 0})


def expected_mean(first: str, second: str) -> float:
    seeds = [s for s in SEEDS if not ((first, second) == FAILED and s == 0)]
    return float(np.mean([pair_value(first, second, s) for s in seeds]))


def fill_grid_study(store: Store) -> None:
    """A `head` study: out_dim x head x 2 seeds (SimCLR Fig. 8), one (out_dim, head) point missing."""
    store.register_study("head", {"axes": {"out_dim": [16, 64, 256], "head": [0, 1, 2]}, "seeds": [0, 1]})
    for out_dim in (16, 64, 256):
        for head in (0, 1, 2):
            if (out_dim, head) == (256, 0):
                continue
            for seed in (0, 1):
                config = from_mapping(dict(out_dim=out_dim, head=head, seed=seed, dataset="synthetic"))
                store.add_study_trial("head", config.hash(), {"out_dim": out_dim, "head": head, "seed": seed})
                add_trial(store, config, {"linear_top1": grid_value(out_dim, head, seed)})


def grid_value(out_dim: int, head: int, seed: int) -> float:
    return 0.5 + 0.1 * head + 0.01 * math.log2(out_dim) + 0.02 * seed


@pytest.fixture(scope="module")
def filled_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "filled.db"
    store = Store(f"sqlite:///{path}")
    fill_aug_pairs(store)
    fill_grid_study(store)
    store.engine.dispose()  # closes the connections, so the WAL is folded into the file
    return path


@pytest.fixture
def store(filled_db: Path, tmp_path: Path) -> Store:
    """A fresh copy of the filled store for each test (filling it takes a few hundred transactions)."""
    path = tmp_path / "r.db"
    shutil.copy(filled_db, path)
    return Store(f"sqlite:///{path}")


# --- statistics ------------------------------------------------------------------------------------------


def test_t_distribution_matches_tables() -> None:
    for df, expected in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert t_two_sided_p(2.0, 5) == pytest.approx(0.101939, abs=1e-5)
    mean, std, count, half = describe([1.0, 2.0, 3.0])
    assert (mean, std, count) == (2.0, 1.0, 3) and half == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    assert math.isnan(describe([0.7])[1]) and describe([])[2] == 0


# --- heatmap ---------------------------------------------------------------------------------------------


def _cell_texts(ax: Axes) -> dict[tuple[int, int], str]:
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_heatmap_draws_stored_means_in_fig5_order_with_blanks(store: Store) -> None:
    frame = load_study(store, "aug-pairs")
    grid = heatmap_grid(frame, "first", "second", "linear_top1")
    baseline = baseline_value(frame, "linear_top1")  # the random-init probe: one per seed, their mean
    assert baseline == pytest.approx(100 * np.mean([0.2 + 0.01 * s for s in SEEDS]))
    crop_rows = frame["axis.first"] == "crop"
    varied = frame.assign(baseline_linear_top1=frame["baseline_linear_top1"] + 0.01 * crop_rows)
    assert baseline_value(varied, "linear_top1") is None  # differs within a seed: no single baseline
    figure = plot_heatmap(grid, "aug-pairs", baseline)
    ax = next(a for a in figure.axes if a.get_label() == "heatmap")
    order = ["crop", "cutout", "color", "blur"]  # SimCLR Fig. 5 order, not the order the study ran in
    assert [t.get_text() for t in ax.get_yticklabels()] == order
    assert [t.get_text() for t in ax.get_xticklabels()] == [*order, "Average"]
    values = ax.images[0].get_array()  # (4, 5): the grid plus the Average column
    texts = _cell_texts(ax)
    for i, first in enumerate(order):
        row = []
        for j, second in enumerate(order):
            if (first, second) in MISSING:
                assert values.mask[i, j] and (i, j) not in texts  # blank, never zero
                continue
            expected = 100 * expected_mean(first, second)
            row.append(expected)
            assert values[i, j] == pytest.approx(expected)
            assert texts[(i, j)].split("\n")[0] == f"{expected:.1f}"
        assert values[i, 4] == pytest.approx(np.mean(row))
        assert texts[(i, 4)] == f"{np.mean(row):.1f}"
    assert texts[(2, 3)] == "40.5\n±0.7"  # color/blur: seed 0 failed, the std of two seeds
    assert texts[(0, 0)] == "31.0\n±1.0"
    assert sum(p.get_hatch() == "///" for p in ax.patches) == len(MISSING)
    colorbar = next(a for a in figure.axes if a is not ax)
    assert colorbar.get_ylabel() == "linear_top1 (%)"
    assert ax.get_ylabel() == "1st transformation" and ax.get_xlabel() == "2nd transformation"
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert any("no finished trial" in t for t in legend) and any("diagonal" in t for t in legend)
    assert f"random-init backbone: {baseline:.1f}" in legend


def test_heatmap_command_writes_figure_and_the_plotted_numbers(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "aug.png"
    result = runner.invoke(app, ["report", "heatmap", "aug-pairs", "--out", str(out), "--db", store.url])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = pd.read_csv(out.with_suffix(".csv"))
    cells = numbers[numbers["second"] != "Average"]
    assert len(cells) == 16 and set(numbers["unit"]) == {"%"}
    for row in cells.itertuples():
        if (row.first, row.second) in MISSING:
            assert math.isnan(row.mean) and row.count == 0
        else:
            assert row.mean == pytest.approx(100 * expected_mean(row.first, row.second))
            assert row.count == (2 if (row.first, row.second) == FAILED else 3)
    average = numbers[(numbers["first"] == "crop") & (numbers["second"] == "Average")]["mean"].item()
    assert average == pytest.approx(100 * np.mean([expected_mean("crop", s) for s in OPS]))


def test_heatmap_of_other_axes_names_the_setting(store: Store, tmp_path: Path) -> None:
    result = render_heatmap(store, "head", rows="out_dim", cols="head", out=tmp_path / "h.svg")
    text = result.path.read_text()
    assert "<svg" in text
    assert np.isnan(result.grid.mean[2, 0])  # out_dim 256 without a projection head was never run
    assert result.grid.mean[0, 2] == pytest.approx(100 * np.mean([grid_value(16, 2, s) for s in (0, 1)]))
    title = plot_heatmap(result.grid, figure_title("head", load_study(store, "head"), "linear_top1"))
    assert title.axes[0].get_title() == (
        "head: linear_top1 (%), mean over 2 seeds\nsynthetic · simclr · smallcnn · 4 epochs"
    )


# --- curves and bars -------------------------------------------------------------------------------------


def test_curve_plots_means_and_seed_error_bars(store: Store) -> None:
    series = series_data(load_study(store, "head"), "out_dim", "head", "linear_top1")
    ax = plot_curve(series, "head").axes[0]
    assert ax.get_xscale() == "log"  # 16 .. 256: powers of two, as in SimCLR Fig. 8
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0", "1", "2"]
    for head, container in zip((0, 1, 2), ax.containers, strict=True):
        x, y = container.lines[0].get_data()
        dims = [d for d in (16, 64, 256) if (d, head) != (256, 0)]  # the missing point is left out
        assert list(x) == dims
        expected = [100 * np.mean([grid_value(d, head, s) for s in (0, 1)]) for d in dims]
        assert list(y) == pytest.approx(expected)
        segments = container.lines[2][0].get_segments()  # error bars: mean ± std over the two seeds
        std = 100 * np.std([grid_value(16, head, s) for s in (0, 1)], ddof=1)
        assert [seg[1][1] - seg[0][1] for seg in segments] == pytest.approx([2 * std] * len(dims))


def test_curve_leaves_a_hue_without_points_out_of_the_legend() -> None:
    mean = np.array([[50.0, 51.0], [np.nan, np.nan]])  # hue "none" has no point (e.g. no z to probe)
    nan = np.full((2, 2), np.nan)
    count = np.array([[1, 1], [0, 0]])
    series = Series("out_dim", "head", [32, 64], ["linear", "none"], mean, nan, nan, count, "m", "%")
    ax = plot_curve(series, "t").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["linear"]
    assert list(ax.lines[0].get_ydata()) == [50.0, 51.0]


def test_bars_leave_missing_out_and_mark_them(store: Store, tmp_path: Path) -> None:
    series = series_data(load_study(store, "head"), "out_dim", "head", "linear_top1")
    ax = plot_bars(series, "head").axes[0]
    heights = [[p.get_height() for p in c.patches] for c in ax.containers if hasattr(c, "patches")]
    assert heights[0] == pytest.approx(
        [100 * np.mean([grid_value(d, 0, s) for s in (0, 1)]) for d in (16, 64)]
    )
    assert len(heights[1]) == len(heights[2]) == 3
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n/a") == 1  # the missing bar; every drawn bar carries its value
    assert sorted(t for t in texts if t != "n/a") == sorted(f"{h:.1f}" for bars in heights for h in bars)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "64", "256"]
    assert all(bars.errorbar is not None for bars in ax.containers if hasattr(bars, "patches"))
    one_seed = series_data(
        apply_where(load_study(store, "head"), {"seed": "0"}), "out_dim", "head", "linear_top1"
    )
    figure = plot_bars(one_seed, "head")
    assert all(bars.errorbar is None for bars in figure.axes[0].containers if hasattr(bars, "patches"))
    assert "one seed per point: no error bars" in [t.get_text() for t in figure.legends[0].get_texts()]
    with_baseline = plot_bars(series, "head", baseline=30.0)
    dashed = [line for line in with_baseline.axes[0].lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [30.0, 30.0]
    notes = [t.get_text() for t in with_baseline.legends[0].get_texts()]
    assert "dashed: random-init backbone (30.0)" in notes
    out = tmp_path / "bars.pdf"
    args = ["report", "bars", "head", "--x", "out_dim", "--hue", "head", "--error", "ci", "--out", str(out)]
    result = runner.invoke(app, [*args, "--db", store.url])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"%PDF"
    numbers = pd.read_csv(out.with_suffix(".csv"))
    point = numbers[(numbers["out_dim"] == 64) & (numbers["head"] == 1)].iloc[0]
    values = [100 * grid_value(64, 1, s) for s in (0, 1)]
    assert point["mean"] == pytest.approx(np.mean(values)) and point["count"] == 2
    assert point["ci95"] == pytest.approx(12.7062 * np.std(values, ddof=1) / math.sqrt(2), rel=1e-4)
    assert numbers[(numbers["out_dim"] == 256) & (numbers["head"] == 0)]["mean"].isna().all()


def test_points_of_one_seed_among_replicated_ones_get_no_error_bar(store: Store) -> None:
    """A follow-up with fewer seeds at a larger budget: no zero-length bar that would claim no spread."""
    mean = np.array([[50.0, 55.0]])
    std = np.array([[1.0, np.nan]])
    count = np.array([[3, 1]])
    labels = ["crop+color (s=1/2)", "crop"]
    series = Series("pair", None, labels, [None], mean, std, std, count, "linear_top1", "%")
    figure = plot_bars(series, "t")
    (bars,) = [c for c in figure.axes[0].containers if hasattr(c, "patches")]
    segments = bars.errorbar.lines[2][0].get_segments()
    drawn = [seg for seg in segments if len(seg) and np.isfinite(seg).all()]
    assert len(drawn) == 1 and drawn[0][1][1] - drawn[0][0][1] == pytest.approx(2.0)  # ± 1 std, seed-3 point
    notes = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "error bars: ± std over seeds" in notes and "points of one seed: no error bar" in notes
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert ticks == ["crop+color\n(s=1/2)", "crop"]  # long labels wrap instead of running into each other
    frame = load_study(store, "head")
    fewer = frame[~((frame["axis.out_dim"] == 16) & (frame["axis.seed"] == 1))]
    assert figure_title("head", fewer, "linear_top1").startswith("head: linear_top1 (%), mean over 1-2 seeds")
    assert "mean over 2 seeds" in figure_title("head", frame, "linear_top1")


# --- tables and exports ----------------------------------------------------------------------------------


def _table(store: Store, fmt: str) -> str:
    args = ["report", "table", "head", "--rows", "out_dim", "--cols", "head", "--format", fmt]
    result = runner.invoke(app, [*args, "--db", store.url])
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_latex_balanced(text: str) -> None:
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", text):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack.pop() == env
    assert not stack
    depth = 0
    for i, ch in enumerate(text):
        if ch in "{}" and (i == 0 or text[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0
    assert depth == 0
    assert text.count(r"\toprule") == text.count(r"\bottomrule") == 1 and r"\midrule" in text


def test_table_formats_hold_the_stored_means(store: Store) -> None:
    markdown = _table(store, "markdown")
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len({line.count(" | ") for line in rows}) == 1 and len(rows) == 2 + 3  # header, rule, 3 out_dims
    assert rows[0] == r"| out_dim \ head | 0 | 1 | 2 |" and rows[1] == "| --- | --: | --: | --: |"
    assert rows[4] == "| 256 | – | 69.0 ± 1.4 | 79.0 ± 1.4 |"  # mean ± std of 0.68 and 0.70, in %

    latex = _table(store, "latex")
    assert_latex_balanced(latex)
    body = latex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert body[2] == r"256 & -- & 69.0 $\pm$ 1.4 & 79.0 $\pm$ 1.4 \\"
    assert all(line.count("&") == 3 for line in body)

    numbers = pd.read_csv(io.StringIO(_table(store, "csv")))
    assert len(numbers) == 9
    for row in numbers.itertuples():
        if (row.out_dim, row.head) == (256, 0):
            assert math.isnan(row.mean)
        else:
            expected = 100 * np.mean([grid_value(row.out_dim, row.head, s) for s in (0, 1)])
            assert row.mean == pytest.approx(expected)

    terminal = _table(store, "table")
    assert "55.0 ± 1.4" in terminal and "–" in terminal


def test_table_of_one_axis_with_where(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "t.md"
    args = ["report", "table", "aug-pairs", "--rows", "first", "--where", "second=crop", "--where", "seed=1"]
    result = runner.invoke(app, [*args, "--format", "markdown", "--out", str(out), "--db", store.url])
    assert result.exit_code == 0, result.output
    lines = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert lines[0] == "| first | linear_top1 (%) |"
    ops = ["crop", "cutout", "color", "blur"]
    assert lines[2:] == [f"| {op} | {100 * pair_value(op, 'crop', 1):.1f} |" for op in ops]


def test_results_of_a_study_in_every_format(store: Store) -> None:
    def results(fmt: str) -> str:
        result = runner.invoke(app, ["results", "--study", "aug-pairs", "--format", fmt, "--db", store.url])
        assert result.exit_code == 0, result.output
        return result.stdout

    frame = pd.read_csv(io.StringIO(results("csv")))
    members = 3 * (len(OPS) ** 2 - len(MISSING)) + 1
    assert len(frame) == members and {"axis.first", "axis.second", "axis.seed"} <= set(frame.columns)
    counts = dict(frame["status"].value_counts())
    assert counts == {"done": members - 2, "failed": 1, "pending": 1}
    records = json.loads(results("json"))
    crop = next(
        r for r in records if (r["axis.first"], r["axis.second"], r["axis.seed"]) == ("crop", "blur", 2)
    )
    assert crop["linear_top1"] == pytest.approx(pair_value("crop", "blur", 2)) and crop["epochs"] == 2
    markdown = [line for line in results("markdown").splitlines() if line.startswith("|")]
    assert len(markdown) == members + 2 and len({line.count(" | ") for line in markdown}) == 1
    latex = results("latex")
    assert_latex_balanced(latex)
    assert r"axis.first & axis.second" in latex and latex.count("\\\\\n") == members + 1
    everything = runner.invoke(app, ["results", "--format", "csv", "--db", store.url])
    assert everything.exit_code == 0
    assert len(pd.read_csv(io.StringIO(everything.stdout))) == members - 1 + 16  # every trial, no pending


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "heatmap", "nope"], "no study named 'nope'"),
        (["report", "heatmap", "empty"], "study 'empty' has no finished trials yet (1 pending)"),
        (
            ["report", "heatmap", "aug-pairs", "--metric", "acc"],
            "recorded metrics: baseline_linear_top1, knn_top1, linear_top1",
        ),
        (["report", "heatmap", "aug-pairs", "--rows", "op"], "the study's axes are: first, second, seed"),
        (["report", "heatmap", "aug-pairs", "--out", "a.jpg"], "use a .png, .svg or .pdf"),
        (["report", "curve", "aug-pairs", "--x", "first"], "choose one with --where second=VALUE"),
        (["report", "table", "head", "--rows", "head", "--where", "head=9"], "no trial has head=9"),
        (["report", "table", "head", "--rows", "head", "--format", "docx"], "unknown format 'docx'"),
        (["results", "--study", "nope"], "studies in the store: aug-pairs, empty, head"),
    ],
)
def test_bad_requests_are_one_line_errors(store: Store, args: list[str], message: str) -> None:
    store.register_study("empty", {})
    store.add_study_trial("empty", from_mapping(dict(seed=9)).hash(), {"seed": 9})
    result = runner.invoke(app, [*args, "--db", store.url])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_unknown_study_and_degenerate_axes_raise_user_errors(store: Store) -> None:
    with pytest.raises(SslabError, match="no study named"):
        load_study(store, "missing")
    with pytest.raises(ConfigError, match="rows and columns must be two different axes"):
        heatmap_grid(load_study(store, "aug-pairs"), "first", "first", "linear_top1")


# --- HTML ------------------------------------------------------------------------------------------------


class _Collector(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for name in ("src", "href"):
            if values.get(name) and not str(values[name]).startswith(("data:", "#")):
                self.external.append(str(values[name]))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack.pop() == tag

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_report_is_self_contained_and_complete(store: Store, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["report", "html", "aug-pairs", "--out", str(tmp_path / "r.html"), "--db", store.url]
    )
    assert result.exit_code == 0, result.output
    parser = _Collector()
    parser.feed((tmp_path / "r.html").read_text())
    parser.close()
    assert parser.stack == [] and parser.external == []  # balanced tags; nothing fetched from outside
    assert parser.images and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert all(base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG" for src in parser.images)
    text = " ".join(parser.text)
    assert "loss is nan at epoch 2" in text and "not run yet" in text  # failures and pending, with reasons
    assert "abc1234" in text and "2.14.1" in text  # provenance: commit, torch version
    assert all(h in text for h in load_study(store, "aug-pairs")["hash"])  # every trial listed
    assert "40.5 ± 0.7" in text  # the table of means
