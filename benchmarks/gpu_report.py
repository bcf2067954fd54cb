"""The pieces of benchmarks/gpu.sh: the machine and data check before it, the summary after it.

    python benchmarks/gpu_report.py env --dataset cifar10 --data-dir ../shared/data --out OUT/env.json
    python benchmarks/gpu_report.py summary --out OUT --device cuda

`env` records the Python, torch and GPU the steps run on, which packages sslab needs are missing, and which
dataset the benchmarks use: the one asked for if it loads (which also fills sslab's dataset cache for the
later steps), else `synthetic` with the reason. `summary` reads what the steps left in OUT (steps.tsv,
log.txt, env.json, peer.json, results.csv) and writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from script_args import ArgumentParser

NEEDED = (
    "torch",
    "torchvision",
    "sqlalchemy",
    "typer",
    "rich",
    "pandas",
    "pytest",
)  # sslab run and its tests
FALLBACK = "synthetic"
TIMED_OUT = (124, 137)  # timeout's status when it stopped the step, and SIGKILL's after --kill-after
LOG_TAIL = 15  # lines of a failed step's log kept in the summary


def environment(dataset: str, data_dir: str | None, device: str) -> dict[str, Any]:
    """The interpreter, torch and GPU, missing packages, and the dataset the benchmarks will use."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "missing_packages": missing,
    }
    import torch

    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        info["cuda"] = torch.version.cuda
    if device == "cuda" and not torch.cuda.is_available():
        info["warning"] = "--device cuda but torch sees no CUDA device"
    info["dataset"] = resolve_dataset(dataset, data_dir)
    return info


def resolve_dataset(name: str, data_dir: str | None) -> dict[str, Any]:
    """`name` with its size if it loads; otherwise the synthetic fallback and why."""
    from sslab.data import load_dataset

    if name == FALLBACK:
        return {"name": FALLBACK, "requested": name, "fallback": False}
    folder = data_dir if data_dir and Path(data_dir).exists() else None
    try:
        data = load_dataset(name, data_dir=folder)
    except Exception as exc:  # any reason it cannot be used: missing, unreadable, a bad archive
        return {
            "name": FALLBACK,
            "requested": name,
            "fallback": True,
            "reason": f"{type(exc).__name__}: {exc}",
        }
    return {
        "name": data.name,
        "requested": name,
        "fallback": False,
        "data_dir": folder,
        "train_images": int(data.train_images.shape[0]),
        "image": list(data.train_images.shape[1:]),
    }


def read_steps(path: Path) -> dict[str, dict[str, Any]]:
    """steps.tsv (name, exit status, seconds, timeout, mode) -> {name: {...}} in the order the steps ran."""
    steps: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        name, rc, seconds, limit, mode = (line.split("\t") + [""] * 5)[:5]
        code = int(rc)
        status = "ok" if code == 0 else "timeout" if code in TIMED_OUT else "failed"
        steps[name] = {
            "status": status,
            "exit": code,
            "seconds": float(seconds) if seconds else None,
            "timeout_s": int(limit),
            **({"mode": mode} if mode else {}),
        }
    return steps


def step_logs(path: Path) -> dict[str, list[str]]:
    """log.txt cut into each step's lines (gpu.sh heads each step with '===== NAME (')."""
    logs: dict[str, list[str]] = {}
    if not path.exists():
        return logs
    current: list[str] | None = None
    for line in path.read_text(errors="replace").splitlines():
        head = re.match(r"===== (\S+) \(", line)
        if head:
            current = logs.setdefault(head.group(1), [])
        elif current is not None and not line.startswith("===== "):
            current.append(line)
    return logs


def pytest_counts(lines: list[str]) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 passed, 2 skipped in 1.2s', '5/40 tests collected ...')."""
    counts: dict[str, int] = {}
    for line in reversed(lines):
        collected = re.search(r"(\d+)(?:/(\d+))? tests? collected", line)
        outcomes = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line)
        if collected:
            counts["collected"] = int(collected.group(1))
        for number, outcome in outcomes:
            counts["errors" if outcome.startswith("error") else outcome] = int(number)
        if collected or outcomes:
            return counts
    return counts


def number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def last_trial(path: Path) -> dict[str, float | str] | None:
    """The last row of `sslab results --format csv`, numbers as floats."""
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return {key: number(value) for key, value in rows[-1].items() if value != ""} if rows else None


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def summary(out: Path, device: str, tiny: bool) -> dict[str, Any]:
    steps = read_steps(out / "steps.tsv")
    logs = step_logs(out / "log.txt")
    env = load_json(out / "env.json")
    peer = load_json(out / "peer.json")
    failed = [name for name, step in steps.items() if step["status"] != "ok"]
    for name in failed:
        steps[name]["log_tail"] = [line for line in logs.get(name, []) if line.strip()][-LOG_TAIL:]
    result: dict[str, Any] = {
        "device": device,
        "tiny": tiny,
        "dataset": (env or {}).get("dataset", {"name": FALLBACK, "fallback": True, "reason": "no env.json"}),
        "env": env,
        "steps": steps,
        "failed_steps": failed,
        "cuda_tests": pytest_counts(logs.get("cuda_tests", [])),
        "images_per_s": None,
        "ratio": None,
        "peer_pipeline": peer,
        "e2e": None,
        "files": sorted(
            path.name for path in out.iterdir() if path.is_file() and path.name != "summary.json"
        ),
    }
    if peer is not None:
        result["images_per_s"] = {
            "sslab": peer["sslab"]["images_per_s"],
            "peer": peer["peer"]["images_per_s"],
        }
        result["ratio"] = peer["ratio"]
        result["augment_share"] = peer["sslab"]["augment_share"]
        result["peak_memory_bytes"] = {name: peer[name]["peak_memory_bytes"] for name in ("sslab", "peer")}
        result["peak_fraction"] = {name: peer[name]["peak_fraction"] for name in ("sslab", "peer")}
    if "run" in steps:
        run = steps["run"]
        result["e2e"] = {
            "status": run["status"],
            "wall_seconds": run["seconds"],
            "trial": last_trial(out / "results.csv"),
        }
    return result


def print_digest(result: dict[str, Any]) -> None:
    dataset = result["dataset"]
    note = f" (fallback: {dataset.get('reason', '')})" if dataset.get("fallback") else ""
    print(f"dataset: {dataset['name']}{note}")
    for name, step in result["steps"].items():
        print(f"  {name:<11} {step['status']:<8} {step['seconds'] or 0:7.1f} s of {step['timeout_s']} s")
    if result["images_per_s"]:
        rates = result["images_per_s"]
        print(
            f"images/s: sslab {rates['sslab']:,.0f}, peer {rates['peer']:,.0f}, ratio {result['ratio']:.2f}x"
        )
    trial = (result["e2e"] or {}).get("trial")
    if trial:
        accuracy = trial.get("linear_top1", float("nan"))
        print(f"end-to-end trial: {result['e2e']['wall_seconds']} s wall, linear probe top-1 {accuracy}")
    if result["failed_steps"]:
        print(f"FAILED: {', '.join(result['failed_steps'])} (see log.txt and summary.json)")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="record the machine and choose the dataset")
    env.add_argument("--dataset", default="cifar10")
    env.add_argument("--data-dir", default=None)
    env.add_argument("--device", default="cuda")
    env.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    report = commands.add_parser("summary", help="write OUT/summary.json from the steps' outputs")
    report.add_argument("--out", type=Path, required=True, help="the folder gpu.sh wrote to")
    report.add_argument("--device", default="cuda")
    report.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.command == "env":
        info = environment(args.dataset, args.data_dir, args.device)
        args.out.write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info, indent=2))
    else:
        result = summary(args.out, args.device, args.tiny)
        (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        print_digest(result)


if __name__ == "__main__":
    main()
