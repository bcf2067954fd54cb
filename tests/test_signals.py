"""`sslab run` under signals: SIGTERM records the trial as interrupted, a killed run leaves it `stale` and
resumable, and a second identical run refuses the trial that a live process holds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import as_from_a_terminal
from sqlalchemy import select

from sslab.store import ClaimRow, Store

SSLAB = shutil.which("sslab", path=str(Path(sys.executable).parent)) or "sslab"
LONG = ["--dataset", "synthetic", "--epochs", "40", "--batch-size", "64", "-q"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")


def start(url: str, launcher: str, *extra: str) -> subprocess.Popen:
    command = [SSLAB, "run", *LONG, "--db", url, *extra]
    if launcher == "background":  # SIGINT ignored, as a shell starts background jobs
        command = ["bash", "-c", '"$@" & wait $!', "bash", *command]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_terminal
    )


def wait_for_epoch(url: str, process: subprocess.Popen, deadline: float = 120) -> tuple[str, int]:
    """(config hash, pid of the `sslab run` holding it) once the trial has finished an epoch."""
    store = Store(url)
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert process.poll() is None, process.communicate()
        with store.session() as session:
            claims = list(session.scalars(select(ClaimRow).where(ClaimRow.worker.is_not(None))))
        for claim in claims:
            row = store.find(claim.config_hash)
            if row and any(m.name == "loss" and m.epoch == 1 for m in store.metrics(row.id)):
                return claim.config_hash, int(str(claim.worker).split(":")[1])
        time.sleep(0.05)
    raise AssertionError("the trial did not finish an epoch in time")


@pytest.mark.parametrize("launcher", ["direct", "background"])
def test_sigterm_records_the_trial_as_interrupted(launcher: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    process = start(url, launcher)
    try:
        config_hash, pid = wait_for_epoch(url, process)
        os.kill(pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    store = Store(url)
    row = store.find(config_hash)
    assert row is not None and row.status == "interrupted"
    assert store.claims([config_hash])[config_hash].worker is None  # released


def test_a_killed_run_is_stale_and_resumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    process = start(url, "direct", "--epochs", "3")
    config_hash, pid = wait_for_epoch(url, process)
    os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=30)
    store = Store(url)
    frame = store.results_frame().set_index("hash")
    assert store.find(config_hash).status == "running" and frame.loc[config_hash, "status"] == "stale"
    first = [m.value for m in store.metrics(store.find(config_hash).id) if m.name == "epoch_seconds"][0]
    resumed = subprocess.run(
        [SSLAB, "run", *LONG, "--epochs", "3", "--db", url, "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    row = store.find(config_hash)
    assert row.status == "done"
    epoch_one = [m.value for m in store.metrics(row.id) if m.name == "epoch_seconds" and m.epoch == 1]
    assert epoch_one == [first]  # replayed from the checkpoint, not trained again


def test_a_second_identical_run_refuses_the_held_trial(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    first = start(url, "direct")
    try:
        config_hash, _ = wait_for_epoch(url, first)
        before = [(m.name, m.epoch, m.value) for m in Store(url).metrics(Store(url).find(config_hash).id)]
        second = subprocess.run(
            [SSLAB, "run", *LONG, "--db", url], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 2, second.stdout + second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "is being trained by another process" in lines[0], second.stderr
        assert Store(url).find(config_hash).status == "running"
        after = [(m.name, m.epoch, m.value) for m in Store(url).metrics(Store(url).find(config_hash).id)]
        assert after[: len(before)] == before  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
