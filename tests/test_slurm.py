"""A study run as a SLURM job array on a real one-node cluster (.ci/run starts one: scripts/slurm-local.sh)
sharing a PostgreSQL store; one task is signalled as a preemption would, and every trial still ends done once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from sslab.cli import app
from sslab.store import ClaimRow, Store

runner = CliRunner()
STUDY = """name = "slurm-tiny"
[base]
dataset = "synthetic"
epochs = 8
batch_size = 64
[axes]
temperature = [0.2, 0.5, 1.0]
"""


def slurm_up() -> bool:
    if not (os.environ.get("SLURM_CONF") and shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no controller answering
        return False
    return done.returncode == 0 and "idle" in done.stdout


pytestmark = pytest.mark.skipif(
    not slurm_up(), reason="no SLURM cluster here (.ci/run starts one with scripts/slurm-local.sh)"
)


def test_sbatch_script_and_store_checks(tmp_path: Path) -> None:
    study = tmp_path / "s.toml"
    study.write_text(STUDY)
    sqlite = runner.invoke(app, ["study", "submit", str(study), "--slurm", "--jobs", "2", "--dry-run"])
    assert sqlite.exit_code == 2 and "cannot share the SQLite store" in sqlite.output
    server = ["--db", "postgresql+psycopg://u@127.0.0.1:1/none"]
    missing = runner.invoke(app, ["study", "submit", str(study), "--slurm", "--dry-run", *server])
    assert missing.exit_code == 2 and "--checkpoint-dir is needed" in missing.output
    script = runner.invoke(
        app,
        ["study", "submit", str(study), "--slurm", "--dry-run", *server, "--checkpoint-dir", str(tmp_path)],
    )
    assert script.exit_code == 0 and "#SBATCH --array=0-1" in script.output
    assert "#SBATCH --signal=USR1@120" in script.output and "exec srun --ntasks=1 " in script.output


def test_a_job_array_shares_the_study_and_survives_a_signalled_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "slurm-tiny.toml"
    study.write_text(STUDY)
    args = ["study", "submit", str(study), "--slurm", "--jobs", "2", "--db", postgres_url]
    args += ["--checkpoint-dir", str(tmp_path / "checkpoints"), "--log-dir", str(tmp_path / "logs")]
    submitted = runner.invoke(app, args)
    assert submitted.exit_code == 0, submitted.output
    array = submitted.output.split("job array ")[1].split()[0]
    store = Store(postgres_url)
    try:
        victim = _wait_for_a_trained_epoch(store, time.monotonic() + 180)
        task = _job_of(store, victim)
        subprocess.run(["scancel", "--signal=TERM", task], check=True, timeout=30)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _queued(array):
            time.sleep(1)
        assert not _queued(array), "the job array did not finish"
    finally:
        subprocess.run(["scancel", array], capture_output=True, timeout=30)
    frame = store.study_frame("slurm-tiny")
    assert len(frame) == 3 and set(frame["status"]) == {"done"}, frame[["hash", "status"]]
    with store.session() as session:
        attempts = {row.config_hash: row.attempts for row in session.scalars(select(ClaimRow))}
    assert attempts == {h: 2 if h == victim else 1 for h in frame["hash"]}  # taken over once, none twice
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert "interrupted" in logs and logs.count("sslab worker: job") == 2


def _wait_for_a_trained_epoch(store: Store, deadline: float) -> str:
    while time.monotonic() < deadline:
        with store.session() as session:
            held = [
                c.config_hash for c in session.scalars(select(ClaimRow).where(ClaimRow.worker.is_not(None)))
            ]
        for config_hash in held:
            row = store.find(config_hash)
            if row and row.status == "running" and any(m.epoch == 1 for m in store.metrics(row.id)):
                return config_hash
        time.sleep(0.2)
    raise AssertionError("no task trained an epoch in time")


def _job_of(store: Store, config_hash: str) -> str:
    for worker in store.workers():
        if worker.config_hash == config_hash and worker.job:
            return worker.job
    raise AssertionError(f"no worker with a job holds {config_hash}")


def _queued(array: str) -> bool:
    listed = subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True, timeout=30)
    return bool(listed.stdout.strip())
