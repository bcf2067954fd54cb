"""`sslab compare`: matched budgets, paired statistics over seeds, learning curves, running missing trials."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sslab.cli import app
from sslab.config import TrialConfig
from sslab.methods import method_info
from sslab.report.compare import Comparison, load_comparison, paired_differences
from sslab.report.stats import paired_difference, t_two_sided_p
from sslab.store import Provenance, Store
from sslab.study.compare import compare_configs

runner = CliRunner()
PROVENANCE = Provenance("cpu", "2.14.1", "0.1.0", "abc1234", "host")
BUDGET = {"dataset": "synthetic", "epochs": "1", "train_subset": "64", "batch_size": "32"}
SETS = [arg for key, value in BUDGET.items() for arg in ("--set", f"{key}={value}")]
LINEAR = {("simclr", 0): 0.60, ("simclr", 1): 0.64, ("simclr", 2): 0.65, ("byol", 0): 0.55, ("byol", 1): 0.58}
LOSS = {"simclr": (4.0, 3.0), "byol": (2.0, 1.5)}  # per-epoch loss of every seed, epochs 1 and 2


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.chdir(tmp_path)  # default outputs go under results/ here
    return Store(f"sqlite:///{tmp_path / 'r.db'}")


def fill_known(store: Store, seeds: list[int], failed: tuple[str, int] | None = None) -> None:
    """Known final metrics (and per-epoch losses) for the compare configs of simclr and byol."""
    every = compare_configs(["simclr", "byol"], list(range(max(seeds) + 1)), BUDGET)
    configs = {key: config for key, config in every.items() if key[1] in seeds}
    for (method, seed), config in configs.items():
        trial_id = store.begin_trial(config, PROVENANCE)
        for epoch, loss in enumerate(LOSS[method], start=1):
            store.log_metrics(trial_id, {"loss": loss + 0.1 * seed}, epoch=epoch)
        if (method, seed) == failed:
            store.finish_trial(trial_id, "failed", reason="loss is nan at epoch 1", wall_time_s=1.0)
            continue
        linear = LINEAR[(method, seed)]
        metrics = {"linear_top1": linear, "knn_top1": linear - 0.1, "images_per_s": 100.0 * (seed + 1)}
        store.log_metrics(trial_id, metrics)
        store.finish_trial(trial_id, "done", collapsed=(method, seed) == ("byol", 1), wall_time_s=5.0 + seed)


def test_paired_statistics_match_closed_forms() -> None:
    mean, low, high, t, p, n = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])  # differences 1, 2, 2
    assert (mean, n) == (pytest.approx(5 / 3), 3) and t == pytest.approx(5.0)
    assert p == pytest.approx(1 - 5 / math.sqrt(27))  # two-sided p of Student's t with 2 dof, closed form
    assert high - mean == pytest.approx(4.302653 * (1 / math.sqrt(3)) / math.sqrt(3), rel=1e-6)
    assert t_two_sided_p(3.0, 1) == pytest.approx(1 - 2 / math.pi * math.atan(3.0))  # Cauchy
    assert math.isnan(paired_difference([1.0], [0.0])[1])  # one seed: no interval


def test_configs_share_one_budget_whatever_the_method_defaults() -> None:
    configs = compare_configs(["simclr", "barlow"], [0, 1], {"epochs": 3})
    budget = {(c.dataset, c.backbone, c.epochs, c.batch_size, c.train_subset) for c in configs.values()}
    assert len(budget) == 1 and next(iter(budget))[2] == 3
    own_defaults = (configs[("barlow", 0)].optimizer, configs[("simclr", 0)].optimizer)
    barlow = method_info("barlow").shared_defaults["optimizer"]
    assert own_defaults == (barlow, TrialConfig.optimizer) == ("adam", "sgd")


def test_compare_reports_stored_trials_without_running(store: Store) -> None:
    fill_known(store, [0, 1, 2], failed=("byol", 2))
    args = ["compare", "simclr", "byol", "--seeds", "0,1,2", *SETS, "--no-run", "--db", store.url]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained" not in result.output  # --no-run: nothing scheduled
    simclr = [100 * LINEAR[("simclr", s)] for s in (0, 1, 2)]
    byol = [100 * LINEAR[("byol", s)] for s in (0, 1)]
    assert f"{np.mean(simclr):.1f} ± {np.std(simclr, ddof=1):.1f}" in result.output
    assert f"{np.mean(byol):.1f} ± {np.std(byol, ddof=1):.1f}" in result.output
    assert "2/3" in result.output and "1/2" in result.output  # byol: 2 of 3 finished, 1 of 2 collapsed

    comparison = load_comparison(store, "compare-simclr-byol")
    linear = next(d for d in paired_differences(comparison, "linear_top1"))
    diffs = [simclr[s] - byol[s] for s in (0, 1)]  # paired on the seeds where both finished
    assert linear.n == 2 and linear.mean == pytest.approx(np.mean(diffs))
    half = 12.706205 * np.std(diffs, ddof=1) / math.sqrt(2)
    assert (linear.ci_low, linear.ci_high) == (
        pytest.approx(linear.mean - half),
        pytest.approx(linear.mean + half),
    )
    assert (
        f"{linear.mean:+.2f}" in result.output
        and f"[{linear.ci_low:+.2f}, {linear.ci_high:+.2f}]" in result.output
    )

    curves = pd.read_csv(Path("results/compare-simclr-byol-curves.csv"))
    loss = curves[(curves["metric"] == "loss") & (curves["group"] == "simclr")].sort_values("epoch")
    assert list(loss["mean"]) == pytest.approx([4.1, 3.1]) and list(loss["count"]) == [3, 3]
    byol_loss = curves[(curves["metric"] == "loss") & (curves["group"] == "byol")]
    assert list(byol_loss["count"]) == [2, 2]  # the failed trial's epochs are not averaged in
    assert Path("results/compare-simclr-byol-curves.png").read_bytes()[:4] == b"\x89PNG"

    table = runner.invoke(
        app, ["report", "table", "compare-simclr-byol", "--rows", "method", "--db", store.url]
    )
    assert table.exit_code == 0 and f"{np.mean(simclr):.1f} ± {np.std(simclr, ddof=1):.1f}" in table.output


def test_compare_errors_are_one_line_and_leave_the_store_alone(store: Store) -> None:
    cases = [
        (["compare", "simclr"], "two or more methods"),
        (["compare", "simclr", "nosuch"], "unknown method(s) nosuch; valid methods:"),
        (["compare", "simclr", "byol", "--set", "seed=3"], "seed cannot be set"),
        (["compare", "simclr", "byol", "--set", "epochs=zero"], "epochs: expected int"),
        (["compare", "simclr", "byol", "--no-run", *SETS], "run it without --no-run"),
        (["compare", "simclr", "byol", "--out", "curves.gif"], "use a .png, .svg or .pdf"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--db", store.url])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert store.studies() == [] and store.trials() == []
    fill_known(store, [0, 1])
    again = runner.invoke(
        app, ["compare", "simclr", "byol", "--seeds", "0,1", *SETS, "--no-run", "--db", store.url]
    )
    assert again.exit_code == 0, again.output
    other = runner.invoke(
        app, ["compare", "simclr", "byol", "--set", "epochs=5", "--no-run", "--db", store.url]
    )
    assert other.exit_code == 2 and "with a different set" in other.output and "--study NAME" in other.output


def test_compare_trains_only_the_missing_trials(store: Store) -> None:
    fill_known(store, [0])  # seed 0 of both methods is already in the store
    args = ["compare", "simclr", "byol", "--seeds", "0,1", *SETS, "--db", store.url]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "method=simclr seed=1: done" in result.output and "method=byol seed=1: done" in result.output
    assert "trained 2 here" in result.output and "seed=0: done" not in result.output
    frame = store.results_frame().set_index(["method", "seed"])
    assert len(frame) == 4 and set(frame["status"]) == {"done"}
    assert frame.loc[("simclr", 0), "linear_top1"] == LINEAR[("simclr", 0)]  # not retrained
    assert all(0.0 <= frame.loc[(m, 1), "linear_top1"] <= 1.0 for m in ("simclr", "byol"))
    assert frame["epochs"].nunique() == frame["train_subset"].nunique() == frame["batch_size"].nunique() == 1
    comparison = load_comparison(store, "compare-simclr-byol")
    assert isinstance(comparison, Comparison) and len(comparison.done) == 4


def test_compare_seeds_are_listed_like_a_study_s(store: Store) -> None:
    old_spelling = runner.invoke(
        app, ["compare", "simclr", "byol", "--seeds", "3", "--no-run", "--db", store.url]
    )
    assert old_spelling.exit_code == 2 and "--seeds 0,1,2 for 3 seed(s)" in old_spelling.output
    fill_known(store, [0, 1, 2], failed=("byol", 2))
    chosen = runner.invoke(
        app, ["compare", "simclr", "byol", "--seeds", "1,2", *SETS, "--no-run", "--db", store.url]
    )
    assert chosen.exit_code == 0, chosen.output
    assert load_comparison(store, "compare-simclr-byol").seeds == [1, 2]


def test_report_training_draws_each_cell_s_per_epoch_metrics(store: Store) -> None:
    fill_known(store, [0, 1, 2], failed=("byol", 2))
    runner.invoke(
        app, ["compare", "simclr", "byol", "--seeds", "0,1,2", *SETS, "--no-run", "--db", store.url]
    )
    for epoch, value in ((1, 0.3), (2, 0.2)):  # a validation kNN recorded per epoch, as a pruned study has
        store.log_metrics(1, {"knn_val_top1": value}, epoch=epoch)
    result = runner.invoke(app, ["report", "training", "compare-simclr-byol", "--db", store.url])
    assert result.exit_code == 0, result.output
    curves = pd.read_csv(Path("results/compare-simclr-byol-training.csv"))
    loss = curves[(curves["metric"] == "loss") & (curves["group"] == "byol")].sort_values("epoch")
    assert list(loss["mean"]) == pytest.approx([2.05, 1.55]) and list(loss["count"]) == [2, 2]
    knn_val = curves[curves["metric"] == "knn_val_top1"].sort_values("epoch")
    assert list(knn_val["mean"]) == pytest.approx([0.3, 0.2]) and list(knn_val["count"]) == [1, 1]
    assert Path("results/compare-simclr-byol-training.png").read_bytes()[:4] == b"\x89PNG"
    empty = runner.invoke(app, ["report", "training", "nope", "--db", store.url])
    assert (
        empty.exit_code != 0
        and "Traceback" not in empty.output
        and len(empty.output.strip().splitlines()) == 1
    )
