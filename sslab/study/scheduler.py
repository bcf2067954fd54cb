"""Run a study: record it, start its workers (in this process or as local processes), show progress, and
read back where it stands."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from sslab.errors import ConfigError, SslabError
from sslab.runner import DEFAULT_CHECKPOINT_DIR, run_trial
from sslab.signals import interruptible, sigterm_as_interrupt
from sslab.store import Store
from sslab.study.expand import StudyPlan
from sslab.study.progress import Event, StudyDisplay, WorkerStopped
from sslab.study.status import TERMINAL, StudyResult, summarise
from sslab.study.worker import Worker, WorkerOptions, open_study, optuna_storage
from sslab.tracking import check_trackers

# Changing these changes what the study's trials mean: a study recorded with others needs --name or --replace.
IDENTITY = ("base", "set", "protocol", "ops", "metric", "direction")


@dataclass(frozen=True)
class RunOptions:
    workers: int | None = None  # local worker processes; default one per device (one on a CPU)
    devices: tuple[str, ...] | None = None  # e.g. ("cuda:0", "cuda:1"); default every visible GPU
    heartbeat_timeout: float = 60.0
    replace: bool = False  # re-point a recorded study at a changed base config
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    name_option: str = "--name"  # how the command that runs the study spells its name option (for errors)
    log: tuple[str, ...] = ()  # trackers for every trial's curves (tensorboard, wandb)

    def __post_init__(self) -> None:  # before anything is recorded
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1 (got {self.workers})")
        check_trackers(self.log)
        if self.heartbeat_timeout <= 0:
            raise ConfigError(f"--heartbeat-timeout must be > 0 seconds (got {self.heartbeat_timeout})")


def prepare(
    plan: StudyPlan, store: Store, replace_recorded: bool = False, name_option: str = "--name"
) -> StudyPlan:
    """Record the study and its grid in the store and create its Optuna study; check that a study recorded
    under the same name means the same thing (more seeds or axis values are fine). Returns the plan with the
    name of its Optuna study: a new version whenever the search space changed, since Optuna's distributions
    cannot change within one study (finished trials are found by their hash and not run again)."""
    space = json.loads(json.dumps(plan.search_space()))
    optuna_name, version = plan.name, 1
    existing = store.study(plan.name)
    if existing is not None:
        old = json.loads(existing.spec_json)
        if old.get("kind") != "study":
            kind = old.get("kind", "different")
            raise ConfigError(f"'{plan.name}' is a {kind} record; pass {name_option} NAME")
        record = json.loads(json.dumps(plan.record()))
        changed = [key for key in IDENTITY if old.get(key) != record.get(key)]
        if changed and not replace_recorded:
            details = "; ".join(f"{key}: {old.get(key)} -> {record.get(key)}" for key in changed)
            raise ConfigError(
                f"study '{plan.name}' is recorded in {store.url} with a different {', '.join(changed)} "
                f"({details}); store this run under another name with {name_option} NAME, or pass --replace "
                "to re-point the study at the new settings (finished trials stay in the store)"
            )
        version = int(old.get("optuna_version", 1))
        optuna_name = old.get("optuna_study", plan.name)
        if changed:
            store.forget_study_trials(plan.name)
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=optuna_name, storage=store.url)
        if changed or old.get("search_space") != space:
            version += 1
            optuna_name = f"{plan.name}.v{version}"
    plan = replace(plan, optuna_name=optuna_name)
    store.register_study(plan.name, {**plan.record(), "search_space": space, "optuna_version": version})
    if plan.is_grid:
        store.keep_study_trials(plan.name, [cell.hash for cell in plan.cells])
    for cell in plan.cells:
        store.add_study_trial(plan.name, cell.hash, cell.axes)
    open_study(plan, optuna_storage(store.url))
    return plan


def assign_devices(options: RunOptions) -> tuple[list[str | None], int | None]:
    """One device per worker, and the CPU threads each worker may use (None: torch's default)."""
    import torch

    devices: list[str | None]
    if options.devices:
        devices = list(options.devices)
    elif torch.cuda.is_available() and torch.cuda.device_count() > 0:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = [None]
    workers = options.workers if options.workers is not None else (len(devices) if devices != [None] else 1)
    assigned = [devices[i % len(devices)] for i in range(workers)]
    on_cpu = all(d is None or d == "cpu" for d in assigned)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers) if on_cpu and workers > 1 else None  # split cores, don't oversubscribe
    return assigned, threads


def _worker_main(plan: StudyPlan, url: str, options: WorkerOptions, events: Any) -> None:
    """Entry point of a local worker process."""
    import torch

    # A shell starts background jobs with SIGINT ignored, and workers inherit that; SIGINT is what the parent
    # sends them, and what the kernel sends when the parent dies.
    interruptible()

    if options.threads is not None:
        torch.set_num_threads(options.threads)
    error, trained = None, 0
    try:
        _interrupt_when_parent_dies()
        trained = Worker(plan, Store(url), options, events.put).run()
    except KeyboardInterrupt:
        error = "interrupted"
    except SslabError as exc:
        error = str(exc)
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():
        events.cancel_join_thread()  # nobody reads the queue any more: do not wait to flush it at exit
    events.put(WorkerStopped(options.index, error, trained))
    if error is not None:
        raise SystemExit(130 if error == "interrupted" else 2)


def _interrupt_when_parent_dies() -> None:
    """On Linux, have the kernel send this worker SIGINT when `study run` dies (even by SIGKILL): it then
    records its trial as interrupted and exits, instead of training on with nobody to report to."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
    except (OSError, AttributeError):  # not Linux: a killed parent leaves its workers to finish their trial
        return
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():  # died before prctl took effect
        raise KeyboardInterrupt


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def run_study(
    plan: StudyPlan,
    url: str | None,
    options: RunOptions,
    console: Console | None = None,
    trial_runner: Callable[..., Any] = run_trial,
) -> StudyResult:
    """Run every trial of the study that is not done yet; returns how the study stands afterwards."""
    console = console or Console(stderr=True)
    store = Store(url)
    plan = prepare(plan, store, options.replace, options.name_option)
    devices, threads = assign_devices(options)
    started = time.perf_counter()
    display = StudyDisplay(console, plan.name, plan.total, len(devices))
    base = WorkerOptions(options.heartbeat_timeout, None, threads, options.checkpoint_dir, log=options.log)
    errors: list[str] = []
    trained = 0
    restore_sigterm = sigterm_as_interrupt()
    try:
        if len(devices) == 1:
            options_1 = replace(base, device=devices[0])
            trained = Worker(plan, store, options_1, display.handle, trial_runner).run()
        else:
            per_worker = [replace(base, device=d, index=i) for i, d in enumerate(devices)]
            errors, trained = _run_processes(plan, store.url, per_worker, display)
    finally:
        restore_sigterm()
        display.close()
    result = summarise(plan, store, time.perf_counter() - started, trained)
    if errors and sum(result.counts.get(s, 0) for s in TERMINAL) < result.total:
        raise SslabError(f"study {plan.name} stopped: {errors[0]}")
    return result


def _run_processes(
    plan: StudyPlan, url: str, options: list[WorkerOptions], display: StudyDisplay
) -> tuple[list[str], int]:
    """Run one process per worker option until all stop; returns their errors and how many trials they
    trained."""
    context = mp.get_context("spawn")
    events = context.Queue()
    processes = [context.Process(target=_worker_main, args=(plan, url, o, events)) for o in options]
    for process in processes:
        process.start()
    errors: list[str] = []
    reported: set[int] = set()
    trained = 0

    def handle(event: Event) -> None:
        nonlocal trained
        if isinstance(event, WorkerStopped):
            trained += event.trained
            if event.error and event.error != "interrupted":
                errors.append(event.error)
        display.handle(event)

    def drain(timeout: float) -> None:
        try:
            handle(events.get(timeout=timeout))
        except queue.Empty:
            return

    try:
        while any(p.is_alive() for p in processes):
            drain(0.2)
            for index, process in enumerate(processes):
                if process.exitcode is not None and process.exitcode < 0 and index not in reported:
                    reported.add(index)
                    display.console.print(
                        f"[yellow]worker {index} (pid {process.pid}) was killed by signal "
                        f"{-process.exitcode}; the other workers take over its trial[/]"
                    )
        while True:
            try:
                handle(events.get_nowait())
            except queue.Empty:
                break
    except KeyboardInterrupt:
        # Passed on to every worker: a SIGTERM, or a SIGINT sent to this process alone (`kill -INT`). A
        # terminal's Ctrl-C reaches the workers too, and they ignore this second one (`interrupt_once`).
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGINT)
        for process in processes:  # they record their trials as interrupted
            process.join(30)
            if process.is_alive():
                process.terminate()
        raise
    if all(p.exitcode for p in processes) and not errors:
        errors.append("every worker stopped before the study finished; run it again to continue")
    return errors, trained
