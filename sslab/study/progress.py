"""Study progress: the events workers send, and the display that shows them (trials done/total, ETA, and
each worker's current trial)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn


@dataclass(frozen=True)
class Overall:
    """The study as a worker last saw it in the store."""

    worker: int
    settled: int  # trials finished one way or another (done, failed, pruned)
    total: int
    running: int


@dataclass(frozen=True)
class TrialStarted:
    worker: int
    label: str
    attempt: int  # > 1: resumed after its worker stopped


@dataclass(frozen=True)
class TrialProgress:
    worker: int
    done_steps: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class TrialEnded:
    worker: int
    label: str
    status: str  # done | cached | failed | pruned | interrupted
    metric: str
    value: float | None
    seconds: float | None
    reason: str | None = None
    trained: bool = True


@dataclass(frozen=True)
class Waiting:
    worker: int
    running_elsewhere: int


@dataclass(frozen=True)
class WorkerStopped:
    worker: int
    error: str | None  # None: finished normally
    trained: int = 0  # trials this worker trained


Event = Overall | TrialStarted | TrialProgress | TrialEnded | Waiting | WorkerStopped


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StudyDisplay:
    """A live view of a running study; prints one line per finished trial so logs keep the history."""

    def __init__(self, console: Console, name: str, total: int, workers: int) -> None:
        self.console = console
        self.name = name
        self.total = total
        self.workers = workers
        self.settled = 0
        self.trained_seconds: list[float] = []
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )
        self.overall = self.progress.add_task(f"study {name}", total=max(total, 1), info="")
        self.rows: dict[int, TaskID] = {}
        self.progress.start()
        self._refresh()

    def eta(self) -> float | None:
        if not self.trained_seconds:
            return None
        mean = sum(self.trained_seconds) / len(self.trained_seconds)
        return max(0, self.total - self.settled) * mean / max(1, self.workers)

    def _refresh(self) -> None:
        info = f"trials  ETA {format_duration(self.eta())}"
        self.progress.update(self.overall, completed=min(self.settled, self.total), info=info)

    def _row(self, worker: int) -> TaskID:
        if worker not in self.rows:
            self.rows[worker] = self.progress.add_task(f"  worker {worker}", total=1, info="")
        return self.rows[worker]

    def handle(self, event: Event) -> None:
        if isinstance(event, Overall):  # the store's count, read by one worker: never step back on it
            self.settled, self.total = max(self.settled, event.settled), event.total
            self.progress.update(self.overall, total=max(event.total, 1))
        elif isinstance(event, TrialStarted):
            resumed = f" (attempt {event.attempt}, resuming)" if event.attempt > 1 else ""
            self.progress.update(
                self._row(event.worker), description=f"  {event.label}{resumed}", completed=0, info=""
            )
        elif isinstance(event, TrialProgress):
            self.progress.update(
                self._row(event.worker),
                completed=event.done_steps,
                total=max(event.total_steps, 1),
                info=f"steps  loss {event.loss:.4f}",
            )
        elif isinstance(event, TrialEnded):
            self._ended(event)
        elif isinstance(event, Waiting):
            self.progress.update(
                self._row(event.worker),
                description=f"  waiting for {event.running_elsewhere} trial(s) running elsewhere",
                completed=0,
                info="",
            )
        elif isinstance(event, WorkerStopped) and event.error:
            self.console.print(f"[red]worker {event.worker} stopped:[/] {event.error}", highlight=False)
        self._refresh()

    def _ended(self, event: TrialEnded) -> None:
        if event.trained and event.status != "interrupted":  # a cached trial is already in the store's count
            self.settled += 1
        if event.trained and event.seconds is not None and event.status == "done":
            self.trained_seconds.append(event.seconds)
        value = f"  {event.metric} {event.value:.4f}" if event.value is not None else ""
        took = f"  ({format_duration(event.seconds)})" if event.trained and event.seconds is not None else ""
        why = f"  {event.reason}" if event.reason else ""
        colours = {"done": "green", "cached": "dim", "failed": "red", "pruned": "yellow"}
        colour = colours.get(event.status, "red")
        self.console.print(
            f"[{min(self.settled, self.total)}/{self.total}] {event.label}: "
            f"[{colour}]{event.status}[/]{value}{took}{why}",
            highlight=False,
        )

    def close(self) -> None:
        self.progress.stop()
