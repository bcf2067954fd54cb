"""Training curves where researchers look: TensorBoard event files per trial, wandb offline, the dashboard."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gloo import free_port
from typer.testing import CliRunner

from sslab.cli import app
from sslab.store import Store

runner = CliRunner()
TINY = ["--dataset", "synthetic", "--batch-size", "64", "--train-subset", "256", "-q"]
STUDY = """name = "dash"
[base]
dataset = "synthetic"
epochs = 1
batch_size = 64
train_subset = 256
[axes]
temperature = [0.2, 0.5]
"""


def test_tensorboard_gets_every_epoch_and_the_final_metrics(tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    result = runner.invoke(app, ["run", *TINY, "--epochs", "3", "--log", "tensorboard", "--db", url])
    assert result.exit_code == 0, result.output
    (trial,) = Store(url).trials()
    events = EventAccumulator(str(tmp_path / "results" / "tensorboard" / trial.config_hash))
    events.Reload()
    losses = events.Scalars("epoch/loss")
    stored = sorted((m.epoch, m.value) for m in Store(url).metrics(trial.id) if m.name == "loss")
    assert [(e.step, pytest.approx(e.value)) for e in losses] == stored and len(stored) == 3
    assert {"epoch/lr", "epoch/images_per_s", "epoch/collapse_ratio", "final/linear_top1"} <= set(
        events.Tags()["scalars"]
    )


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", *TINY, "--log", "wandb", "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert result.exit_code == 2 and "pip install 'sslab[wandb]'" in result.output
    assert not (tmp_path / "r.db").exists() or Store(f"sqlite:///{tmp_path / 'r.db'}").trials() == []
    unknown = runner.invoke(app, ["run", *TINY, "--log", "mlflow", "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert unknown.exit_code == 2 and "choose from tensorboard, wandb" in unknown.output


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.skipif(
    shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)) is None,
    reason="optuna-dashboard is not installed (pip install -e '.[dev]')",
)
def test_the_store_opens_in_optuna_dashboard(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dash.toml").write_text(STUDY)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert runner.invoke(app, ["study", "run", str(tmp_path / "dash.toml"), "--db", url]).exit_code == 0
    dashboard = shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent))
    port = free_port()
    server = subprocess.Popen(
        [str(dashboard), url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = None
        deadline = time.monotonic() + 60
        while studies is None and time.monotonic() < deadline:  # bounded: a few polls of one local server
            try:
                studies = _get(f"http://127.0.0.1:{port}/api/studies")
            except OSError:
                time.sleep(0.5)
        assert isinstance(studies, dict), "optuna-dashboard did not answer"
        (study,) = [s for s in studies["study_summaries"] if s["study_name"] == "dash"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}?after=0")
        assert isinstance(detail, dict)
        values = sorted(t["values"][0] for t in detail["trials"] if t["state"] == "Complete")
        stored = sorted(Store(url).final_metrics(r.id)["linear_top1"] for r in Store(url).trials())
        assert values == pytest.approx(stored) and len(values) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)
