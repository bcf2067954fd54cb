"""Where the seconds of one trial go, and how long a command takes whose trial is already done.

Runs one trial the way `sslab run` does (`run_trial` into a new store) with timers around its parts, then
runs the same `sslab run` command again in a fresh process, which finds the trial done:

    SSLAB_DATA=../shared/data .venv/bin/python benchmarks/trial_overhead.py --dataset cifar10 \
        --train-subset 20000 --epochs 4
    .venv/bin/python benchmarks/trial_overhead.py --dataset synthetic --epochs 1   # a quick look

Prints each part's seconds and share of the trial: loading the data, the random-init baseline (only
where the store lacks it: `--baseline-stored` runs a first trial to store it, as a study's later trials
find it), the label-free metrics after each epoch, training, and the final evaluation (features, linear
probe, kNN). `--json OUT` writes the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from script_args import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

started = time.perf_counter()
from sslab import runner  # noqa: E402
from sslab.config import from_mapping  # noqa: E402
from sslab.errors import SslabError  # noqa: E402
from sslab.store import Store  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started


class Timers:
    """Seconds spent inside wrapped functions, by part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return function(*args, **kwargs)

        return timed


def timed_trial(config_values: dict[str, Any], store: Store, folder: Path) -> dict[str, Any]:
    """Run one trial with timers around its parts; their seconds and the trial's wall time."""
    timers = Timers()
    originals = {name: getattr(runner, name) for name in ("prepare_dataset", "evaluate", "_label_free")}
    evaluations = 0

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        nonlocal evaluations
        evaluations += 1  # the baseline's evaluation comes first, where the store lacks it
        with timers.part("baseline" if evaluations == 1 and needs_baseline else "evaluation"):
            return originals["evaluate"](*args, **kwargs)

    def label_free(*args: Any, **kwargs: Any) -> Any:
        with timers.part("label_free_setup"):
            measure = originals["_label_free"](*args, **kwargs)
        return timers.wrap("label_free", measure)

    config = from_mapping(config_values)
    key = runner.baseline_hash(config, runner.resolve_device(config.device))
    needs_baseline = store.baseline(key) is None
    runner.prepare_dataset = timers.wrap("data", originals["prepare_dataset"])
    runner.evaluate = evaluate
    runner._label_free = label_free
    try:
        start = time.perf_counter()
        outcome = runner.run_trial(config, store, checkpoint_dir=folder / "checkpoints", keep_weights=False)
        wall = time.perf_counter() - start
    finally:
        for name, function in originals.items():
            setattr(runner, name, function)
    parts = dict(timers.seconds)
    parts["train"] = outcome.metrics["train_seconds"]
    parts["label_free"] = parts.get("label_free", 0.0)
    parts["other"] = wall - sum(v for k, v in parts.items())
    return {"wall_s": wall, "parts_s": parts, "metrics": outcome.metrics}


def done_command_seconds(argv: list[str], db: str) -> float:
    """Wall seconds of `sslab run ARGS` in a new process whose trial is already done in `db`."""
    command = [sys.executable, "-m", "sslab.cli", "run", *argv, "--db", db]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0 or "already done" not in out.stderr:
        raise SslabError(f"the repeated command did not find its trial done: {out.stderr.strip()[-300:]}")
    return seconds


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--baseline-stored", action="store_true", help="store the baseline first")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    argv = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--backbone", args.backbone]
    argv += ["--precision", args.precision]
    values: dict[str, Any] = {"dataset": args.dataset, "epochs": args.epochs, "backbone": args.backbone}
    values["precision"] = args.precision
    if args.train_subset:
        argv += ["--train-subset", str(args.train_subset)]
        values["train_subset"] = args.train_subset
    folder = Path(tempfile.mkdtemp(prefix="sslab-overhead-"))
    db = f"sqlite:///{folder / 'bench.db'}"
    try:
        store = Store(db)
        if args.baseline_stored:
            timed_trial({**values, "epochs": 1, "out_dim": 64}, store, folder)  # another trial, same baseline
        trial = timed_trial(values, store, folder)
        done = done_command_seconds(argv, db)
    except SslabError as exc:
        raise SystemExit(f"error: {exc}") from None
    wall = trial["wall_s"]
    print(f"trial: {' '.join(argv)}; torch and sslab imported in {IMPORT_SECONDS:.2f} s")
    for name, seconds in sorted(trial["parts_s"].items(), key=lambda item: -item[1]):
        print(f"  {name:<18} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")
    print(f"  {'trial wall':<18} {wall:7.2f} s")
    evaluation = trial["parts_s"].get("evaluation", 0.0)
    print(f"evaluation share: {100 * evaluation / wall:.1f}% of the trial")
    print(f"the same command, trial already done: {done:.2f} s")
    if args.json:
        report = {**trial, "import_s": IMPORT_SECONDS, "done_command_s": done, "argv": argv}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
