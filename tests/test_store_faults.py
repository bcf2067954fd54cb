"""A damaged, garbage, unreachable or read-only store: every command ends in one line, and writes nothing."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslab.cli import app

runner = CliRunner()
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "-q"]
STUDY = """name = "tiny"
[base]
dataset = "synthetic"
epochs = 1
batch_size = 64
train_subset = 256
[axes]
temperature = [0.2, 0.5]
"""


def filled_store(directory: Path) -> Path:
    """A store with a finished study and a trial, as one file (its WAL checkpointed away)."""
    path = directory / "r.db"
    study = directory / "tiny.toml"
    study.write_text(STUDY)
    url = f"sqlite:///{path}"
    for args in (["study", "run", str(study), "--db", url], ["run", *TINY, "--db", url]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    # The commands' pooled connections close when collected, and the last one to close removes the -wal
    # file: collect them now, so that the files do not change later, whatever runs in between.
    gc.collect()
    with contextlib.closing(sqlite3.connect(path)) as db:  # everything into the main file
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def commands(path: Path) -> list[list[str]]:
    db = ["--db", f"sqlite:///{path}"]
    return [
        ["run", *TINY, *db],
        ["results", *db],
        ["study", "list", *db],
        ["study", "run", str(path.parent / "tiny.toml"), *db],
        ["study", "status", "tiny", *db],
        ["study", "show", str(path.parent / "tiny.toml"), *db],
        ["report", "table", "tiny", "--rows", "temperature", *db],
        ["compare", "simclr", "byol", "--seeds", "0", "--no-run", *db],
        ["report", "heatmap", "tiny", "--rows", "temperature", "--cols", "seed", *db],
        ["report", "html", "tiny", *db],
        ["store", "backup", str(path.parent / "copy.db"), *db],
        ["store", "export", str(path.parent / "trials.jsonl"), *db],
        ["store", "import", str(path.parent / "tiny.toml"), *db],
    ]


def digest(directory: Path) -> dict[str, str]:
    """The store's content: its file and WAL (the -shm file is SQLite's shared-memory index, not content)."""
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.endswith("-shm")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_damaged_page_stops_every_command_with_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = filled_store(tmp_path)
    size = path.stat().st_size
    assert size >= 4 * 4096
    with sqlite3.connect(path) as db:  # a b-tree page in use: the metrics table's root (not the header page)
        (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sslab_metrics'").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    with path.open("r+b") as handle:
        handle.seek((root - 1) * page_size + page_size // 2)
        handle.write(b"\xff\x00garbage-garbage-garbage\x13\x37" * 40)
    before = digest(tmp_path)
    for args in commands(path):
        result = runner.invoke(app, args, env={"COLUMNS": "1000"})
        lines = [line for line in result.output.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert result.exit_code != 0 and "Traceback" not in result.output, (args, result.output)
        assert len(errors) == 1 and lines[-1] == errors[0], (args, result.output)  # it ends in one line
        assert "is damaged" in errors[0] and "PRAGMA integrity_check" in errors[0], (args, errors)
        assert digest(tmp_path) == before, args  # nothing written, no -wal or -shm file created


@pytest.mark.parametrize("content", [b"this is not a database" * 100, b""])
def test_a_garbage_store_fails_every_command(content: bytes, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.db"
    (tmp_path / "tiny.toml").write_text(STUDY)
    path.write_bytes(content)
    for args in commands(path)[1:3]:  # results, study list
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        if content:
            assert result.exit_code != 0 and len(lines) == 1 and "is damaged" in lines[0], (
                args,
                result.output,
            )
    unreachable = runner.invoke(
        app, ["study", "list", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"]
    )
    assert unreachable.exit_code != 0 and "Traceback" not in unreachable.output, unreachable.output


def _read_only_mount(source: Path, target: Path) -> bool:
    """Bind-mount `source` read-only at `target` (root on Linux); False where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        return False
    remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True)
    if remounted.returncode != 0:
        subprocess.run(["umount", str(target)], capture_output=True)
        return False
    return True


def test_a_read_only_store_can_be_read(tmp_path: Path, monkeypatch) -> None:
    """A colleague's results on a read-only mount: reading commands work, writing ones fail in one line."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "source"
    source.mkdir()
    filled_store(source)
    shared = tmp_path / "shared"
    if not _read_only_mount(source, shared):
        pytest.skip("needs root and a read-only bind mount to make a store that cannot be written")
    try:
        before = digest(shared)
        url = f"sqlite:///{shared / 'r.db'}"
        for args in (
            ["study", "status", "tiny", "--db", url],
            ["report", "table", "tiny", "--rows", "temperature", "--db", url],
            ["study", "list", "--db", url],
        ):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        results = runner.invoke(app, ["results", "--db", url, "--format", "csv"])
        assert results.exit_code == 0 and results.stdout.count("\n") == 3  # header, 2 trials (run is one)
        write = runner.invoke(app, ["run", *TINY, "--seed", "5", "--db", url])
        lines = [line for line in write.output.splitlines() if line.strip()]
        assert write.exit_code != 0 and len(lines) == 1 and "read-only" in lines[0], write.output
        assert digest(shared) == before
    finally:
        subprocess.run(["umount", "--lazy", str(shared)], capture_output=True)  # this process may hold it


def test_store_missing_is_not_an_error_for_study_list(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["study", "list", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 0 and not (tmp_path / "none.db").exists()  # listing creates no store
