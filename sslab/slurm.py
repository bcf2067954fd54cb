"""A study's workers as a SLURM job array: the sbatch script, its submission, and the running job's identity.

Each array task runs one `sslab study run` worker, as a job step (`srun`), against the study's shared store
(PostgreSQL for more than one machine). Trials are claimed by identity in the store, so tasks never train the
same trial. Before its time limit a task gets SIGUSR1 (`--signal=USR1@...`): it records its trial as
interrupted (the last epoch checkpoint stays, on a path every node reads) and requeues itself; a cancelled or
preempted task (SIGTERM, e.g. `scancel --signal=TERM`, which signals job steps) leaves its trial to the other
tasks, which resume it from that checkpoint.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sslab.errors import ConfigError, SslabError


@dataclass(frozen=True)
class SlurmOptions:
    jobs: int = 2  # array tasks, one worker each
    partition: str | None = None
    gpus_per_job: int = 0
    time: str | None = None  # the tasks' time limit, e.g. 4:00:00
    account: str | None = None
    cpus_per_job: int | None = None
    warn_seconds: int = 120  # SIGUSR1 this long before the time limit: time to record the trial and requeue

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1 (got {self.jobs})")
        if self.gpus_per_job < 0:
            raise ConfigError(f"--gpus-per-job must be >= 0 (got {self.gpus_per_job})")


def job_id() -> str | None:
    """This process's SLURM job (`ARRAYJOB_TASK` for an array task), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_self() -> None:
    """Put this SLURM job back in the queue (best effort: outside SLURM or without scontrol, nothing)."""
    job, scontrol = os.environ.get("SLURM_JOB_ID"), shutil.which("scontrol")
    if job and scontrol:
        subprocess.run([scontrol, "requeue", job], capture_output=True, timeout=30)


def check_store(url: str, jobs: int) -> None:
    """Several machines need one server database: SQLite's file locks do not hold over network filesystems."""
    from sqlalchemy.engine import make_url  # SQLAlchemy is slow to import: only where a job is submitted

    if make_url(url).get_backend_name() == "sqlite" and jobs > 1:
        raise ConfigError(
            f"{jobs} SLURM jobs cannot share the SQLite store {url}: SQLite's locking is not safe across "
            "machines on a network filesystem; pass --db postgresql+psycopg://USER@HOST/DB (or --jobs 1)"
        )


def checkpoint_dir(url: str, given: Path | None) -> Path:
    """Where the tasks keep epoch checkpoints: given, or beside a SQLite store; PostgreSQL needs one given."""
    if given is not None:
        return given.expanduser().resolve()
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(str(parsed.database)).expanduser().resolve().parent / "checkpoints"
    raise ConfigError(
        "--checkpoint-dir is needed with a server store: a folder every node can read and write, so that a "
        "task can resume a trial another task was interrupted in"
    )


def sbatch_script(
    command: Sequence[str], name: str, options: SlurmOptions, log_dir: Path, workdir: Path
) -> str:
    """The job array's batch script: each task runs one worker as its job step; `exec srun` makes the batch
    shell srun itself, which passes every signal (SLURM's, scancel's, a preemption's) on to sslab."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=sslab-{name}",
        f"#SBATCH --array=0-{options.jobs - 1}",
        f"#SBATCH --output={log_dir}/%x-%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=USR1@{options.warn_seconds}",
    ]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    if options.time:
        lines.append(f"#SBATCH --time={options.time}")
    if options.gpus_per_job:
        lines.append(f"#SBATCH --gpus-per-task={options.gpus_per_job}")
    if options.cpus_per_job:
        lines.append(f"#SBATCH --cpus-per-task={options.cpus_per_job}")
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        'echo "sslab worker: job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on $(hostname), $(date -Is)"',
        "exec srun --ntasks=1 " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def submit(script: str) -> str:
    """Submit a batch script; returns the job id, or a one-line error."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SslabError(
            "sbatch not found: submit from a SLURM login node (or print the script with --dry-run)"
        )
    done = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise SslabError(f"sbatch refused the job: {why}")
    return done.stdout.strip().split(";")[0]
