"""Small command-line promises: the version, defaults in --help, counters that never repeat, numbers
without float noise, and options that make no sense refused before anything is recorded."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

import sslab
from sslab.cli import app
from sslab.store import Store
from sslab.study.progress import Overall, StudyDisplay, TrialEnded

runner = CliRunner()


def test_version_and_defaults_in_help() -> None:
    assert runner.invoke(app, ["--version"]).output.strip() == f"sslab {sslab.__version__}"
    text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "250"}).output
    assert "[default: 4]" in text and "[default: simclr]" in text and "[default: sgd]" in text
    for flag in ("--resume", "--force", "--quiet", "--config", "--set", "--db", "--temperature"):
        block = text[text.index(flag) :].split("\n│ --", 1)[0]
        assert "[default:" in block, flag
    assert "PATH/train/ and PATH/test/" in text and "held out for test" in text  # how a folder is split


def test_study_counters_never_repeat_or_skip() -> None:
    """Two workers: stale store counts from one, cached trials on a resume, trials finishing elsewhere."""
    out = io.StringIO()
    display = StudyDisplay(Console(file=out, width=200), "s", 6, 2)
    events = [
        Overall(0, 2, 6, 0),  # two trials finished before this run
        TrialEnded(0, "a", "cached", "m", 0.5, 1.0, trained=False),
        TrialEnded(0, "b", "cached", "m", 0.5, 1.0, trained=False),
        TrialEnded(0, "c", "done", "m", 0.5, 1.0),
        Overall(1, 2, 6, 1),  # worker 1 read the store before c was recorded
        TrialEnded(1, "d", "done", "m", 0.5, 1.0),
        Overall(0, 4, 6, 0),
        TrialEnded(0, "e", "failed", "m", None, 1.0, "nan"),
        TrialEnded(1, "f", "done", "m", 0.5, 1.0),
    ]
    for event in events:
        display.handle(event)
    display.close()
    counters = re.findall(r"\[(\d)/6\] (\w)", out.getvalue())
    trained = [int(n) for n, label in counters if label in "cdef"]
    assert trained == [3, 4, 5, 6], out.getvalue()


def test_exports_have_no_float_noise(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["run", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "256"]
    assert runner.invoke(app, [*args, "-q", "--db", url]).exit_code == 0
    store = Store(url)
    (trial,) = store.trials()
    store.log_metrics(trial.id, {"linear_top1": 0.7749999761581421})  # float32(0.775), as a probe stores it
    csv = runner.invoke(app, ["results", "--db", url, "--format", "csv"]).stdout
    assert "0.775," in csv and "0.7749999" not in csv


def test_zero_workers_is_refused_before_anything_is_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = runner.invoke(app, ["study", "run", "aug-pairs-mini", "--workers", "0", "--db", url])
    assert result.exit_code == 2 and "--workers must be at least 1" in result.output
    assert not (tmp_path / "r.db").exists() or Store(url).studies() == []


def test_study_status_lists_the_workers_with_their_jobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study = tmp_path / "s.toml"
    study.write_text('name = "s"\n[base]\ndataset = "synthetic"\n[axes]\ntemperature = [0.2, 0.5]\n')
    assert runner.invoke(app, ["study", "show", str(study), "--db", url]).exit_code == 0
    from sslab.study import load_plan
    from sslab.study.scheduler import prepare

    store = Store(url)
    prepare(load_plan(str(study)), store)
    store.register_worker("node7:4242:abc123", "node7", 4242, "s", job="1234_1")
    store.heartbeat("node7:4242:abc123", "deadbeefdeadbeef")
    shown = runner.invoke(app, ["study", "status", "s", "--db", url], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.output.splitlines() if "node7:4242" in line)
    assert "1234_1" in line and "node7" in line and "deadbeefdeadbeef" in line and "s ago" in line
