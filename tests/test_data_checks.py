"""Data that would silently mislead: mismatched class folders, unreadable files, an ignored --data-dir."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from sslab import fingerprint
from sslab.cli import app
from sslab.data import DatasetWarning, load_dataset
from sslab.errors import DatasetError

runner = CliRunner()


def write_split(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    generator = np.random.default_rng(0)
    for split, classes in (("train", train), ("test", test)):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_test_class_missing_from_train_is_refused(tmp_path: Path) -> None:
    root = write_split(tmp_path / "d", {"cat": 3, "ship": 3}, {"cat": 2, "Ship": 2})
    with pytest.raises(DatasetError) as error:
        load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "Ship" in message and "ship" in message and "\n" not in message


def test_unreadable_images_are_reported_before_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_split(tmp_path / "d", {"a": 40, "b": 40}, {"a": 10, "b": 10})
    (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    args = ["run", "--dataset", f"imagefolder:{root}", "--epochs", "1", "--batch-size", "16", "-q"]
    result = runner.invoke(app, [*args, "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert result.exit_code == 0, result.output
    warning = result.output.index("skipped 1 unreadable image file")
    assert warning < result.output.index("linear_top1")  # said when the data is loaded, not at the end


def test_an_ignored_data_dir_is_said(tmp_path: Path) -> None:
    with pytest.warns(DatasetWarning, match="does not exist"):
        load_dataset("synthetic", data_dir=tmp_path / "nowhere")
    with pytest.warns(DatasetWarning, match="needs no data folder"):
        load_dataset("fashion-mnist-mini", data_dir=tmp_path)


def test_a_changed_image_folder_is_a_new_trial(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_split(tmp_path / "d", {"a": 40, "b": 40}, {"a": 10, "b": 10})
    db = f"sqlite:///{tmp_path / 'r.db'}"
    args = [
        "run",
        "--dataset",
        f"imagefolder:{root}",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "-q",
        "--db",
        db,
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert "already done" in runner.invoke(app, args).output  # the same files: the same trial
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "train" / "a" / "new.png")
    fingerprint.forget()  # as a new command would: this test runs them all in one process
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already done" not in again.output, again.output
    listed = runner.invoke(app, ["results", "--db", db, "--format", "csv"]).stdout
    frame = pd.read_csv(io.StringIO(listed))
    assert frame["data_fingerprint"].nunique() == 2 and frame["hash"].nunique() == 2
