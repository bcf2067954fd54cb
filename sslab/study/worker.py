"""A study worker: asks Optuna for the next trial, claims it in the results store, trains it, tells Optuna.

Optuna chooses (GridSampler, TPE or random sampling), prunes (MedianPruner via `trial.report` /
`should_prune`) and records every trial in its storage, which lives in the results store's database. Optuna's
storage also keeps each running trial's heartbeat and fails the trials of a worker that stopped
(`fail_stale_trials`); a search retries them (`RetryFailedTrialCallback`). What Optuna does not do is sslab's:
trials are identified by their config hash, a trial already done is never trained again (its stored value is
told to Optuna), and a worker runs a trial only after claiming its identity atomically in the results store.
The claims of a worker that stopped (killed, machine lost) go stale after `heartbeat_timeout` and another
worker takes the trial over, resuming it from its last epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import Trial, TrialState

from sslab import slurm
from sslab.claims import ClaimHeartbeat, new_worker_id, pid_alive
from sslab.config import TrialConfig
from sslab.data import ImageDataset
from sslab.errors import SslabError
from sslab.evaluate import extract_features, knn_val_top1
from sslab.methods.base import Method
from sslab.metrics import KNN_VAL_TOP1
from sslab.runner import DEFAULT_CHECKPOINT_DIR, prepare_dataset, provenance, run_trial
from sslab.store import SQLITE_BUSY_TIMEOUT_S, Store
from sslab.study.expand import Cell, StudyPlan
from sslab.study.progress import (
    Event,
    Overall,
    TrialEnded,
    TrialProgress,
    TrialStarted,
    Waiting,
)
from sslab.study.status import TERMINAL
from sslab.train import EpochRecord, TrialFailed, channel_stats, resolve_device

MAX_ATTEMPTS = 3  # a trial whose worker died this many times is recorded as failed

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class WorkerOptions:
    heartbeat_timeout: float = 60.0  # seconds without a heartbeat after which a worker is presumed dead
    device: str | None = None  # overrides the trials' device (runtime only: not part of the hash)
    threads: int | None = None  # torch CPU threads for this worker
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    index: int = 0  # this worker's number among the local workers (for progress)
    log: tuple[str, ...] = ()  # trackers that get each trial's curves (tensorboard, wandb)

    @property
    def interval(self) -> float:
        """Seconds between heartbeats and between polls of the store."""
        return max(0.1, self.heartbeat_timeout / 6)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def optuna_storage(
    url: str, heartbeat_timeout: float | None = None, retry: bool = False
) -> optuna.storages.RDBStorage:
    """Optuna's storage in the results store's database (Optuna's tables sit beside sslab_*).

    With `heartbeat_timeout`, running trials record heartbeats and a trial silent for that long is failed by
    `fail_stale_trials`; with `retry`, a failed stale trial is asked again (a search; a grid finds its cell
    unfinished in the results store instead)."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    heartbeats: dict[str, Any] = {}
    if heartbeat_timeout is not None:
        heartbeats = {  # Optuna counts both in whole seconds
            "heartbeat_interval": max(1, round(heartbeat_timeout / 6)),
            "grace_period": max(2, math.ceil(heartbeat_timeout)),
            "heartbeat_stale_trial_callback": optuna.storages.RetryFailedTrialCallback() if retry else None,
        }
    for attempt in range(3):  # workers starting together may race to create the tables
        try:
            with warnings.catch_warnings():  # Optuna calls its heartbeat options experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeats)
        except Exception:
            if attempt == 2:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its `study.stop()` when the grid is exhausted: that call only works inside
    `optimize`, and a study's end is decided by the results store (a grid point may need a rerun)."""

    def after_trial(self, study: optuna.Study, trial: Any, state: TrialState, values: Any) -> None:
        pass


def open_study(plan: StudyPlan, storage: optuna.storages.RDBStorage) -> optuna.Study:
    spec = plan.spec
    if spec.sampler == "grid":
        sampler: optuna.samplers.BaseSampler = GridSampler(plan.grid_space(), seed=0)
    elif spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler()
    else:
        sampler = optuna.samplers.RandomSampler()
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if spec.pruner is not None:
        pruner = optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner.startup_trials, n_warmup_steps=spec.pruner.warmup_epochs
        )
    return optuna.create_study(
        study_name=plan.optuna_study,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction=spec.direction,
        load_if_exists=True,
    )


def params_key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True)


def epoch_knn(method: Method, config: TrialConfig, dataset: ImageDataset) -> float:
    """Weighted-kNN top-1 of the validation split of train on the current frozen features: what pruning
    watches (it never extracts the test images)."""
    device = next(method.parameters()).device
    mean, std = channel_stats(dataset.train_images)
    train = extract_features(method, dataset.train_images, mean, std, device)["h"]
    labels = dataset.train_labels.to(device)
    return knn_val_top1(train, labels, dataset.num_classes, config.val_fraction, config.knn_k, config.knn_t)


class Heartbeat(ClaimHeartbeat):
    """Also marks the worker's running Optuna trial alive (Optuna's own heartbeat)."""

    def __init__(
        self, store: Store, worker: str, interval: float, storage: optuna.storages.RDBStorage
    ) -> None:
        super().__init__(store, worker, interval)
        self.storage = storage
        self.optuna_trial: int | None = None  # the Optuna trial id of the running trial

    def beat(self) -> None:
        super().beat()
        with contextlib.suppress(Exception):
            if self.optuna_trial is not None:
                self.storage.record_heartbeat(self.optuna_trial)


class StepReporter:
    """Forwards training progress to the study display, at most a few times a second."""

    def __init__(self, emit: Callable[[Event], None], worker: int) -> None:
        self.emit, self.worker = emit, worker
        self.total, self.last = 1, 0.0

    def start(self, total_steps: int, done_steps: int) -> None:
        self.total = total_steps
        self.emit(TrialProgress(self.worker, done_steps, total_steps, math.nan))

    def step(self, done_steps: int, loss: float, images_per_s: float) -> None:
        now = time.monotonic()
        if now - self.last >= 0.5 or done_steps == self.total:
            self.last = now
            self.emit(TrialProgress(self.worker, done_steps, self.total, loss))

    def epoch(self, record: EpochRecord) -> None:
        pass

    def finish(self) -> None:
        pass


TrialRunner = Callable[..., Any]  # run_trial's signature; replaceable to measure the scheduler alone


class Worker:
    """Runs trials of one study until none is left to run (by this or any other worker)."""

    def __init__(
        self,
        plan: StudyPlan,
        store: Store,
        options: WorkerOptions,
        emit: Callable[[Event], None],
        trial_runner: TrialRunner = run_trial,
    ) -> None:
        self.plan, self.store, self.options, self.emit = plan, store, options, emit
        self.trial_runner = trial_runner
        self.id = new_worker_id()
        self.host = socket.gethostname()
        self.storage = optuna_storage(store.url, options.heartbeat_timeout, retry=not plan.is_grid)
        self.study = open_study(plan, self.storage)
        self.study_id = self.storage.get_study_id_from_name(plan.optuna_study)
        self.cells = {params_key(cell.axes): cell for cell in plan.cells}
        self.grid_size = math.prod(len(v) for v in plan.grid_space().values()) if plan.is_grid else 0
        self.datasets: dict[tuple[Any, ...], ImageDataset] = {}
        self.baselines: dict[tuple[Any, ...], dict[str, float]] = {}
        self.heartbeat = Heartbeat(store, self.id, options.interval, self.storage)
        self.trained = 0
        self._last_reap = -math.inf

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Work until the study is complete; returns how many trials this worker trained."""
        self.store.register_worker(self.id, self.host, os.getpid(), self.plan.name, slurm.job_id())
        self.heartbeat.start()
        try:
            while True:
                self._reap()
                decision = self._next()
                if decision == "done":
                    return self.trained
                if decision == "wait":
                    time.sleep(self.options.interval)
                    continue
                with warnings.catch_warnings():  # heartbeats are recorded by this worker's own thread
                    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
                    trial = self.study.ask()
                self._handle(trial)
        finally:
            self.heartbeat.stop()
            self.store.remove_worker(self.id)

    def _next(self) -> str:
        """'ask' when a trial can be run now, 'wait' when the rest is running elsewhere, else 'done'."""
        return self._next_grid() if self.plan.is_grid else self._next_search()

    def _next_grid(self) -> str:
        cells = self.plan.cells
        statuses = self.store.statuses(c.hash for c in cells)
        pending = [c for c in cells if statuses.get(c.hash) not in TERMINAL]
        held = self._held({c.hash for c in pending})
        self.emit(Overall(self.options.index, len(cells) - len(pending), len(cells), len(held)))
        trials = self.study.get_trials(deepcopy=False)
        space = self.plan.grid_space()
        touched = {
            params_key(t.params)
            for t in trials
            if t.state != TrialState.WAITING and t.system_attrs.get("search_space") == space
        }
        # Grid points the GridSampler has not handed out yet; finished ones cost only a lookup, and asking
        # for them completes this Optuna study's record (e.g. after new seeds made a new one).
        untouched = len(touched) < self.grid_size or any(t.state == TrialState.WAITING for t in trials)
        if not pending:
            return "ask" if untouched else "done"
        free = [c for c in pending if c.hash not in held]
        if not free:
            self.emit(Waiting(self.options.index, len(held)))
            return "wait"
        if untouched:
            return "ask"
        # Every grid point was handed out, yet this one is unfinished (interrupted, or its worker died).
        self.study.enqueue_trial(dict(random.choice(free).axes), user_attrs={"requeued": True})
        return "ask"

    def _next_search(self) -> str:
        trials = self.study.get_trials(deepcopy=False)
        retried = {optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) for t in trials}
        retried |= {t.user_attrs.get("retry_of") for t in trials}
        settled = sum(
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in retried)
            for t in trials
        )
        running = sum(t.state == TrialState.RUNNING for t in trials)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        total = int(self.plan.spec.n_trials or 0)
        self.emit(Overall(self.options.index, min(settled, total), total, running))
        if waiting or settled + running < total:
            return "ask"
        if running:
            self.emit(Waiting(self.options.index, running))
            return "wait"
        return "done"

    def _held(self, hashes: set[str]) -> set[str]:
        """The hashes claimed by a live worker."""
        cutoff = _now() - timedelta(seconds=self.options.heartbeat_timeout)
        claims = self.store.claims(hashes)
        return {h for h, c in claims.items() if c.worker is not None and c.heartbeat_at >= cutoff}

    def _reap(self) -> None:
        """Declare dead workers dead: on this host by their pid, elsewhere by their heartbeat, so that their
        claims are free; Optuna fails their silent trials (a search asks them again; a grid finds them
        unfinished in the store)."""
        if time.monotonic() - self._last_reap < self.options.interval:
            return
        self._last_reap = time.monotonic()
        now = _now()
        cutoff = now - timedelta(seconds=self.options.heartbeat_timeout)
        recent = now - timedelta(seconds=2 * self.options.interval)
        dead = set()
        for worker in self.store.workers():
            if worker.id == self.id:
                continue
            if worker.host == self.host and not pid_alive(worker.pid) and worker.heartbeat_at < recent:
                self.store.expire_worker(worker.id)  # its claims are free now, not after the timeout
                self.store.remove_worker(worker.id)
                dead.add(worker.id)
            elif worker.heartbeat_at < cutoff:
                self.store.remove_worker(worker.id)
                dead.add(worker.id)
        # A worker known dead: its Optuna trial is failed now rather than after Optuna's grace period.
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("worker") in dead:
                with contextlib.suppress(Exception):  # another worker failed it first
                    self.study.tell(trial.number, state=TrialState.FAIL)
                    if not self.plan.is_grid:  # a search asks for it again; a grid finds it unfinished
                        self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # silent trials, whoever ran them

    # --- one trial --------------------------------------------------------------------------------------

    def _suggest(self, trial: Trial) -> dict[str, Any]:
        axes: dict[str, Any] = {}
        for axis in self.plan.spec.axes:
            if axis.discrete:
                axes[axis.name] = trial.suggest_categorical(axis.name, list(axis.values))
            elif axis.kind == "int":
                axes[axis.name] = trial.suggest_int(
                    axis.name, int(axis.low or 0), int(axis.high or 0), step=int(axis.step or 1)
                )
            else:
                low, high = float(axis.low or 0), float(axis.high or 0)
                log = axis.kind == "log"
                axes[axis.name] = trial.suggest_float(axis.name, low, high, step=axis.step, log=log)
        seeds = list(self.plan.spec.seeds)
        axes["seed"] = trial.suggest_categorical("seed", seeds) if self.plan.is_grid else seeds[0]
        return axes

    def _handle(self, trial: Trial) -> None:
        trial.set_user_attr("worker", self.id)
        axes = self._suggest(trial)
        if self.plan.is_grid:
            cell = self.cells.get(params_key(axes))
            if cell is None:  # a combination the study file excludes
                trial.set_user_attr("excluded", True)
                self.study.tell(trial, state=TrialState.PRUNED)
                return
        else:
            cell = self.plan.cell_for(axes)
            self.store.add_study_trial(self.plan.name, cell.hash, cell.axes)
        trial.set_user_attr("config_hash", cell.hash)
        self._execute(trial, cell)

    def _execute(self, trial: Trial, cell: Cell) -> None:
        waited = False
        while True:
            status = self.store.statuses([cell.hash]).get(cell.hash)
            if status in TERMINAL:
                self._tell_recorded(trial, cell)
                return
            attempt = self.store.claim_trial(cell.hash, self.id, self.options.heartbeat_timeout)
            if attempt:
                break
            if not waited:
                self.emit(Waiting(self.options.index, 1))
                waited = True
            time.sleep(self.options.interval)  # another live worker runs it: take its result when done
        self.heartbeat.current = cell.hash
        self.heartbeat.optuna_trial = self.storage.get_trial_id_from_study_id_trial_number(
            self.study_id, trial.number
        )
        self.heartbeat.beat()
        try:
            if attempt > MAX_ATTEMPTS:
                self._abandon(trial, cell, attempt)
            else:
                self._train(trial, cell, attempt)
        finally:
            self.heartbeat.current = self.heartbeat.optuna_trial = None
            self.store.release_trial(cell.hash, self.id)

    def _tell_recorded(self, trial: Trial, cell: Cell) -> None:
        """Tell Optuna the stored result of a trial that needs no run."""
        row = self.store.find(cell.hash)
        assert row is not None
        metric = self.plan.spec.metric
        value = self.store.final_metrics(row.id).get(metric) if row.status == "done" else None
        trial.set_user_attr("cached", True)
        if row.status == "done" and value is not None and math.isfinite(value):
            self.study.tell(trial, value)
        elif row.status == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("reason", row.reason or f"{metric} was not recorded")
            self.study.tell(trial, state=TrialState.FAIL)
        status = "cached" if row.status == "done" else row.status
        index, seconds = self.options.index, row.wall_time_s
        self.emit(TrialEnded(index, cell.label, status, metric, value, seconds, row.reason, False))

    def _dataset(self, config: TrialConfig) -> ImageDataset:
        """Each dataset is loaded once per worker and shared by its trials."""
        key = (config.dataset, config.data_dir, config.image_size, config.train_subset)
        if key not in self.datasets:
            if len(self.datasets) >= 2:
                self.datasets.pop(next(iter(self.datasets)))
            self.datasets[key] = prepare_dataset(config)
        return self.datasets[key]

    def _pruning_hook(
        self, trial: Trial, config: TrialConfig, dataset: ImageDataset
    ) -> Callable[[Method, EpochRecord, dict[str, float]], None] | None:
        pruner = self.plan.spec.pruner
        if pruner is None:
            return None
        # Optuna compares intermediate values in the study's direction: flip a metric improving the other way.
        sign = 1.0 if pruner.direction == self.plan.spec.direction else -1.0

        def hook(method: Method, record: EpochRecord, extra: dict[str, float]) -> None:
            if pruner.metric == KNN_VAL_TOP1.name:
                extra[KNN_VAL_TOP1.name] = epoch_knn(method, config, dataset)
            value = {**record.metrics(), **extra}[pruner.metric]
            trial.report(sign * value, record.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned after epoch {record.epoch}: {pruner.metric} {value:.4g} is worse than the median"
                )

        return hook

    def _train(self, trial: Trial, cell: Cell, attempt: int) -> None:
        config = cell.config
        if self.options.device is not None:
            config = config.with_runtime(device=self.options.device)
        metric, index = self.plan.spec.metric, self.options.index
        dataset = self._dataset(config)
        self.emit(TrialStarted(index, cell.label, attempt))
        self.trained += 1  # run here, whatever its end (done, failed, pruned)
        started = time.perf_counter()
        try:
            outcome = self.trial_runner(
                config,
                self.store,
                resume=True,
                reporter=StepReporter(self.emit, index),
                checkpoint_dir=self.options.checkpoint_dir,
                dataset=dataset,
                epoch_hook=self._pruning_hook(trial, config, dataset),
                baseline_cache=self.baselines,
                log=self.options.log,
            )
        except optuna.TrialPruned as exc:
            self._mark(cell, "pruned", str(exc))
            (self.options.checkpoint_dir / f"{cell.hash}.pt").unlink(missing_ok=True)
            self.study.tell(trial, state=TrialState.PRUNED)
            seconds = time.perf_counter() - started
            self.emit(TrialEnded(index, cell.label, "pruned", metric, None, seconds, str(exc)))
            return
        except KeyboardInterrupt:
            trial.set_user_attr("failure", "interrupted")
            self.study.tell(trial, state=TrialState.FAIL)
            if not self.plan.is_grid:  # a search asks for it again; a grid finds it unfinished
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            self.emit(TrialEnded(index, cell.label, "interrupted", metric, None, None))
            raise
        except Exception as exc:
            if isinstance(exc, SslabError) and not isinstance(exc, TrialFailed) and not self._recorded(cell):
                raise  # not the trial's fault (no device, store unreachable): stop the worker
            reason: str | None  # None below when the trial ends without a reason
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not self._recorded(cell):
                self._record_failure(config, reason)
            self._free_accelerator()
            trial.set_user_attr("reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
            seconds = time.perf_counter() - started
            self.emit(TrialEnded(index, cell.label, "failed", metric, None, seconds, reason))
            return
        value = outcome.metrics.get(metric)
        if outcome.collapsed:
            trial.set_user_attr("collapsed", True)
        if value is None or not math.isfinite(value):
            trial.set_user_attr("reason", f"{metric} was not recorded")
            self.study.tell(trial, state=TrialState.FAIL)
        else:
            self.study.tell(trial, value)
        reason = "collapsed" if outcome.collapsed else None
        self.emit(TrialEnded(index, cell.label, "done", metric, value, outcome.wall_time_s, reason))

    def _recorded(self, cell: Cell) -> bool:
        return self.store.statuses([cell.hash]).get(cell.hash) in TERMINAL

    def _mark(self, cell: Cell, status: str, reason: str) -> None:
        row = self.store.find(cell.hash)
        if row is not None:
            self.store.finish_trial(row.id, status, reason, None, row.wall_time_s)

    def _record_failure(self, config: TrialConfig, reason: str) -> None:
        trial_id = self.store.begin_trial(config, provenance(resolve_device("cpu")))
        self.store.finish_trial(trial_id, "failed", reason)

    def _abandon(self, trial: Trial, cell: Cell, attempt: int) -> None:
        reason = f"abandoned: its worker stopped {attempt - 1} times while running it"
        if self.store.find(cell.hash) is None:
            self._record_failure(cell.config, reason)
        else:
            self._mark(cell, "failed", reason)
        trial.set_user_attr("reason", reason)
        self.study.tell(trial, state=TrialState.FAIL)
        metric = self.plan.spec.metric
        self.emit(TrialEnded(self.options.index, cell.label, "failed", metric, None, None, reason))

    @staticmethod
    def _free_accelerator() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory failure, the next trial starts clean
