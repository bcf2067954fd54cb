"""A store written by the release before canonical identities (schema 0) opens, migrates and is reused."""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from sslab.runner import run_trial
from sslab.store import Store, StoreWarning
from sslab.store_migrations import SCHEMA_VERSION
from sslab.study import load_plan
from sslab.study.scheduler import RunOptions, run_study

FIXTURE = Path(__file__).parent / "fixtures" / "store-v0"
# Methods whose behaviour version this release raised (losses in float32 under autocast).
CHANGED_SINCE = {"simclr", "moco", "dino", "barlow", "swav"}
PIPELINE_1 = {"pipeline_version": "1"}  # the shared pipeline the old release ran; today's is another trial


@pytest.fixture
def old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    shutil.copy(FIXTURE / "store.db", tmp_path / "store.db")
    return f"sqlite:///{tmp_path / 'store.db'}"


def expected() -> dict[tuple[int, str], tuple[str, str, float]]:
    with (FIXTURE / "expected.csv").open() as handle:
        return {
            (int(row["id"]), row["metric"]): (row["old_hash"], row["method"], float(row["value"]))
            for row in csv.DictReader(handle)
        }


def test_old_store_opens_with_the_same_trials_and_metrics(old_store: str) -> None:
    with pytest.warns(StoreWarning) as caught:
        store = Store(old_store)
    notes = [str(w.message) for w in caught]
    assert f"migrated from schema 0 to {SCHEMA_VERSION}: 9 trial(s) re-identified" in notes[0]
    assert any("trials 9 and 10 are one trial" in note for note in notes)  # `color` and `color(s=1)`
    frame = store.results_frame().set_index("id")
    for (trial_id, metric), (_, method, value) in expected().items():
        assert frame.loc[trial_id, "method"] == method and frame.loc[trial_id, metric] == value
        assert frame.loc[trial_id, "status"] == "done"
    assert len(frame) == 10
    assert frame.loc[10, "duplicate_of"] == frame.loc[9, "hash"] and frame["duplicate_of"].notna().sum() == 1
    # computed by the first behaviour of every method and by the first shared pipeline: all older
    assert frame["older_behaviour"].all() and (frame["pipeline_version"] == 1).all()
    assert frame["precision_used"].isna().all()  # recorded from schema 5 on
    with sqlite3.connect(old_store.removeprefix("sqlite:///")) as db:
        (version,) = db.execute("SELECT value FROM sslab_meta WHERE key = 'schema_version'").fetchone()
    assert int(version) == SCHEMA_VERSION
    assert Store(old_store).migration is None  # once only


def test_rerunning_the_old_study_trains_only_what_this_release_changed(old_store: str) -> None:
    trained: list[str] = []

    def recording(config, store, **kwargs):  # type: ignore[no-untyped-def]
        trained.append(config.method)
        return run_trial(config, store, **kwargs)

    with pytest.warns(StoreWarning):
        Store(old_store)
    # On the old shared pipeline, only the methods whose own behaviour changed train again.
    plan = load_plan(str(FIXTURE / "study.toml"), PIPELINE_1)
    result = run_study(plan, old_store, RunOptions(replace=True), trial_runner=recording)
    assert set(trained) == CHANGED_SINCE and result.counts == {"done": 8}
    assert trained.count("simclr") == 2 and result.trained == len(trained) == 6
    stored = {row.config_hash for row in Store(old_store).trials()}
    assert {cell.hash for cell in plan.cells} <= stored
    assert len(stored) == 10 + 6  # the old trials stay, beside the new behaviour's
    # As recorded, on today's pipeline, every cell is a new trial; none of the stored ones is taken for it.
    trained.clear()
    today = load_plan(str(FIXTURE / "study.toml"))
    result = run_study(today, old_store, RunOptions(replace=True), trial_runner=recording)
    assert result.trained == 8 and len({row.config_hash for row in Store(old_store).trials()}) == 10 + 6 + 8


def test_a_rerun_with_sslab_run_finds_the_old_trial(old_store: str) -> None:
    from typer.testing import CliRunner

    from sslab.cli import app

    tiny = ["--dataset", "synthetic", "--train-subset", "256", "--epochs", "1", "--batch-size", "64"]
    # simclr and the shared pipeline changed since: their first behaviour is looked up
    old_behaviour = ["--set", "method_version=1", "--set", "pipeline_version=1"]
    for aug in ("crop,color", "crop(scale=0.08-1),color(s=1)"):
        result = CliRunner().invoke(app, ["run", *tiny, "--aug", aug, *old_behaviour, "--db", old_store])
        assert result.exit_code == 0 and "already done as trial 9" in result.output, result.output
    result = CliRunner().invoke(app, ["run", *tiny, "--aug", "crop", *old_behaviour, "--db", old_store])
    assert result.exit_code == 2 and "version 1 is found in the store, not trained" in result.output


@pytest.mark.skipif(os.cpu_count() != 2, reason="the fixture's numbers were computed with 2 CPU threads")
def test_this_release_computes_the_numbers_the_old_one_recorded(tmp_path: Path, monkeypatch) -> None:
    """Moving the settings into the methods changed no arithmetic: fresh trials equal the stored ones, also
    for the methods whose behaviour version changed since: their version 2 changed only mixed-precision
    numbers, and the defaults their version 3 changed (DINO's clipping and weight-decay schedule, SwAV's
    prototype freezing) are set back to the old values here."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    old_defaults = {
        **PIPELINE_1,
        "dino.clip_grad": "0",
        "weight_decay_end": "none",
        "swav.freeze_prototypes": "1",
        "swav.freeze_fraction": "0",
    }
    plan = load_plan(str(FIXTURE / "study.toml"), old_defaults)
    run_study(plan, url, RunOptions())
    fresh = Store(url).results_frame().set_index("method")
    old = {(method, metric): value for (_, metric), (_, method, value) in expected().items()}
    for method in ("moco", "dino", "swav", "barlow", "instdisc", "byol"):
        for metric in ("linear_top1", "knn_top1"):
            assert fresh.loc[method, metric] == old[(method, metric)], (method, metric)


def test_an_old_postgresql_store_migrates_too(tmp_path: Path, monkeypatch, postgres_url: str) -> None:
    """The schema-0 fixture's trials copied into PostgreSQL, in the tables the old release created there."""
    from sqlalchemy import MetaData, create_engine, insert, select, text

    from sslab.store import Base

    monkeypatch.chdir(tmp_path)
    source = create_engine(f"sqlite:///{FIXTURE / 'store.db'}")
    target = create_engine(postgres_url)
    new_tables = ("sslab_meta", "sslab_baselines")  # schemas 1 and 4
    old_tables = [t for t in Base.metadata.sorted_tables if t.name not in new_tables]
    Base.metadata.create_all(target, tables=old_tables)
    fixture = MetaData()
    fixture.reflect(source, only=[t.name for t in old_tables])
    with source.connect() as reading, target.begin() as writing:
        for column in ("duplicate_of", "threads", "pretrained_from", "precision"):  # schemas 1, 2, 4, 5
            writing.execute(text(f"ALTER TABLE sslab_trials DROP COLUMN {column}"))
        writing.execute(text("ALTER TABLE sslab_workers DROP COLUMN job"))  # added by schema 3
        for table in old_tables:
            rows = [dict(row._mapping) for row in reading.execute(select(fixture.tables[table.name]))]
            if rows:
                writing.execute(insert(fixture.tables[table.name]), rows)
        for name in ("sslab_trials", "sslab_metrics", "sslab_study_trials"):  # ids were copied: move on
            writing.execute(
                text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT MAX(id) FROM {name}))")
            )
    source.dispose()
    target.dispose()
    with pytest.warns(StoreWarning, match=f"migrated from schema 0 to {SCHEMA_VERSION}"):
        store = Store(postgres_url)
    frame = store.results_frame().set_index("id")
    for (trial_id, metric), (_, method, value) in expected().items():
        assert frame.loc[trial_id, "method"] == method and frame.loc[trial_id, metric] == pytest.approx(value)
    plan = load_plan(str(FIXTURE / "study.toml"), PIPELINE_1)

    trained: list[str] = []

    def recording(config, store, **kwargs):  # type: ignore[no-untyped-def]
        trained.append(config.method)
        return run_trial(config, store, **kwargs)

    assert run_study(plan, postgres_url, RunOptions(replace=True), trial_runner=recording).trained == 6
    assert set(trained) == CHANGED_SINCE
