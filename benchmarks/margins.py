"""The margins of the tests that check short pretraining beats random init, with `--precision auto`
computing in fp32 and, on a CPU with native bf16, in bf16.

    .venv/bin/python benchmarks/margins.py                    # every such test, both precisions
    .venv/bin/python benchmarks/margins.py -k "simclr or byol" --precisions bf16

The suite pins `auto` to fp32 (`tests/conftest.py`) so that its margins hold on every CI machine; this runs
the selected tests once per precision in a pytest process of their own (`SSLAB_TEST_AUTO_BF16=1` lets `auto`
pick bf16 where the CPU computes it natively), records the final metrics each test's trials logged, and
prints, per test and precision, linear top-1, the random-init baseline's, their difference (the margin the
test asserts a floor on) and whether the test passed. `--json OUT` writes the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from script_args import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent
RECORD_ENV = "SSLAB_MARGINS_RECORD"


class _Recorder:
    """A pytest plugin: the final metrics (`log_metrics` without an epoch) every test's trials logged."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):  # type: ignore[no-untyped-def]
        from sslab.store import Store

        original = Store.log_metrics
        final: dict[str, float] = {}

        def recording(store: Store, trial_id: int, metrics: Any, epoch: int | None = None) -> None:
            if epoch is None:
                final.update({name: float(value) for name, value in metrics.items()})
            original(store, trial_id, metrics, epoch)

        Store.log_metrics = recording  # type: ignore[method-assign]
        try:
            outcome = yield
        finally:
            Store.log_metrics = original  # type: ignore[method-assign]
        self.rows[item.nodeid] = {"passed": outcome.excinfo is None, "metrics": final}

    def pytest_sessionfinish(self) -> None:
        Path(self.path).write_text(json.dumps(self.rows, indent=1))


def _run(selection: str, tests: list[str], bf16: bool, record: Path) -> dict[str, dict[str, Any]]:
    env = {**os.environ, RECORD_ENV: str(record), "SSLAB_TEST_AUTO_BF16": "1" if bf16 else "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-q", "-p", "margins", "-k", selection, *tests]
    subprocess.run(command, cwd=ROOT, env=env, check=False)
    if not record.exists():
        raise SystemExit(f"error: pytest recorded nothing for -k {selection!r} (see its output above)")
    return json.loads(record.read_text())


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="selection", default="beats_random_init", help="pytest -k expression")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("tests", nargs="*", default=["tests"], help="test files or folders (default: tests)")
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"error: --precisions takes fp32 and/or bf16, not {args.precisions!r}")
    missing = [path for path in args.tests if not (ROOT / path).exists()]
    if missing:
        raise SystemExit(f"error: no such test file or folder: {', '.join(missing)}")
    if "bf16" in precisions:
        from sslab.runtime import native_bf16_cpu

        if not native_bf16_cpu():
            raise SystemExit(
                "error: this CPU has no native bf16, so `auto` computes in fp32; use --precisions fp32"
            )
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in precisions:
            record = Path(scratch) / f"{precision}.json"
            recorded = _run(args.selection, args.tests, precision == "bf16", record)
            for test, row in recorded.items():
                metrics = row["metrics"]
                linear, baseline = metrics.get("linear_top1"), metrics.get("baseline_linear_top1")
                margin = None if linear is None or baseline is None else linear - baseline
                rows.append(
                    {
                        "test": test,
                        "precision": precision,
                        "passed": row["passed"],
                        "linear_top1": linear,
                        "baseline_linear_top1": baseline,
                        "margin": margin,
                    }
                )
    print(f"{'test':<90} {'auto':<5} {'linear':>7} {'random':>7} {'margin':>7}  result")
    for row in sorted(rows, key=lambda r: (r["test"], r["precision"])):
        cells = " ".join(
            f"{row[k]:7.4f}" if row[k] is not None else f"{'-':>7}"
            for k in ("linear_top1", "baseline_linear_top1", "margin")
        )
        result = "passed" if row["passed"] else "FAILED"
        print(f"{row['test']:<90} {row['precision']:<5} {cells}  {result}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def pytest_configure(config: pytest.Config) -> None:
    """Loaded as a plugin (`-p margins`) by the pytest processes `main` starts."""
    path = os.environ.get(RECORD_ENV)
    if path:
        config.pluginmanager.register(_Recorder(path), "sslab-margins-recorder")


if __name__ == "__main__":
    main()
