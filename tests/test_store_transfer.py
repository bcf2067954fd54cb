"""Backups, and trials exported from one store and imported into another by identity."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from sslab.cli import app
from sslab.store import Store

runner = CliRunner()
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "-q"]


def run_seeds(url: str, seeds: list[int]) -> None:
    for seed in seeds:
        result = runner.invoke(app, ["run", *TINY, "--seed", str(seed), "--db", url])
        assert result.exit_code == 0, result.output


def summary(url: str) -> dict[str, tuple[str, float]]:
    store = Store(url)
    return {
        row.config_hash: (row.status, store.final_metrics(row.id)["linear_top1"]) for row in store.trials()
    }


def test_trials_merge_by_identity_without_duplicates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    laptop, cluster = f"sqlite:///{tmp_path / 'laptop.db'}", f"sqlite:///{tmp_path / 'cluster.db'}"
    run_seeds(laptop, [0, 1])
    run_seeds(cluster, [1, 2])
    exported = tmp_path / "laptop.jsonl"
    result = runner.invoke(app, ["store", "export", str(exported), "--db", laptop])
    assert result.exit_code == 0 and "exported 2 trial(s)" in result.output, result.output
    header = json.loads(exported.read_text().splitlines()[0])
    assert header["format"] == "sslab-trials"
    imported = runner.invoke(app, ["store", "import", str(exported), "--db", cluster])
    assert imported.exit_code == 0 and "imported 1 new trial(s)" in imported.output, imported.output
    assert "kept 1 already here" in imported.output
    merged = summary(cluster)
    assert len(merged) == 3 and merged == {**summary(laptop), **merged}  # seed 0 came over with its numbers
    again = runner.invoke(app, ["store", "import", str(exported), "--db", cluster])
    assert "imported 0 new trial(s)" in again.output and len(summary(cluster)) == 3
    refused = runner.invoke(app, ["store", "export", str(exported), "--db", laptop])
    assert refused.exit_code == 2 and "exists" in refused.output


def test_backup_is_a_store_with_the_same_trials(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    run_seeds(url, [0])
    copy = tmp_path / "copy.db"
    result = runner.invoke(app, ["store", "backup", str(copy), "--db", url])
    assert result.exit_code == 0, result.output
    assert summary(f"sqlite:///{copy}") == summary(url)
    again = runner.invoke(app, ["store", "backup", str(copy), "--db", url])
    assert again.exit_code == 2 and "exists" in again.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    failed = runner.invoke(app, ["store", "import", str(bad), "--db", url])
    assert failed.exit_code == 2 and "not an sslab export" in failed.output and len(summary(url)) == 1
