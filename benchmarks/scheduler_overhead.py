"""Scheduler overhead per study trial: everything but training and evaluation.

Runs the `aug-pairs` preset (49 trials) through the real scheduler (Optuna ask/tell, claims, heartbeats, store
reads and writes) with a stand-in for `run_trial` that records each trial in the store without training, so
the time per trial is the scheduler's alone. `--real N` also runs N tiny real trials and reports the study's
wall time minus the time spent inside `run_trial`.

    .venv/bin/python benchmarks/scheduler_overhead.py [--db URL] [--real 4]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from script_args import ArgumentParser

from sslab.config import TrialConfig
from sslab.runner import TrialOutcome, provenance, run_trial
from sslab.store import Store
from sslab.study import load_plan
from sslab.study.scheduler import RunOptions, run_study
from sslab.train import resolve_device


def record_without_training(config: TrialConfig, store: Store, **_: Any) -> TrialOutcome:
    """What run_trial writes to the store, minus the work in between."""
    trial_id = store.begin_trial(config, provenance(resolve_device("cpu")))
    store.log_metrics(trial_id, {"loss": 1.0, "lr": 0.1}, epoch=1)
    metrics = {"linear_top1": 0.5, "knn_top1": 0.5, "baseline_linear_top1": 0.1}
    store.log_metrics(trial_id, metrics)
    store.finish_trial(trial_id, "done", None, False, 0.0)
    return TrialOutcome(trial_id, config.hash(), "done", metrics, collapsed=False, wall_time_s=0.0)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", help="results store URL (default: a new SQLite file in a temp dir)")
    parser.add_argument("--real", type=int, default=0, help="also run this many tiny real trials")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    url = args.db or f"sqlite:///{folder / 'bench.db'}"
    quiet = Console(file=io.StringIO())

    plan = load_plan("aug-pairs", {"dataset": "synthetic"}, stored_name=f"bench-{time.time_ns()}")
    started = time.perf_counter()
    result = run_study(plan, url, RunOptions(heartbeat_timeout=60), quiet, record_without_training)
    seconds = time.perf_counter() - started
    print(f"store: {Store(url).url}")
    per_trial = 1000 * seconds / result.total
    print(
        f"scheduler only: {result.total} trials in {seconds:.2f} s = {per_trial:.0f} ms per trial "
        "(study record, Optuna ask/tell, claim, heartbeat, store reads and writes)"
    )
    again = time.perf_counter()
    run_study(plan, url, RunOptions(heartbeat_timeout=60), quiet, record_without_training)
    print(f"rerun of the finished study (nothing to train): {time.perf_counter() - again:.2f} s")

    if args.real:
        inside: list[float] = []

        def timed(config: TrialConfig, store: Store, **kwargs: Any) -> TrialOutcome:
            begin = time.perf_counter()
            try:
                return run_trial(config, store, **kwargs)
            finally:
                inside.append(time.perf_counter() - begin)

        tiny = dict(dataset="synthetic", image_size="16", train_subset="128", epochs="1", batch_size="32")
        real = load_plan("temperature", tiny, stored_name=f"real-{time.time_ns()}")
        real = type(real)(real.spec, real.name, real.overrides, real.cells[: args.real], real.excluded)
        started = time.perf_counter()
        run_study(real, url, RunOptions(heartbeat_timeout=60, checkpoint_dir=folder / "ck"), quiet, timed)
        total = time.perf_counter() - started
        overhead = (total - sum(inside)) / len(inside)
        print(
            f"real: {len(inside)} trials in {total:.2f} s, {statistics.mean(inside):.2f} s each inside "
            f"run_trial; scheduler overhead {1000 * overhead:.0f} ms per trial (dataset loading included)"
        )


if __name__ == "__main__":
    main()
