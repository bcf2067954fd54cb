"""A rich progress bar for training: steps, loss, images/s and time left."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from sslab.train import EpochRecord


class RichReporter:
    """Shows one trial's training progress; prints a line per epoch so logs keep the history."""

    def __init__(self, console: Console | None = None, description: str = "pretraining") -> None:
        self.console = console or Console(stderr=True)
        self.description = description
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def start(self, total_steps: int, done_steps: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:,.0f} img/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=total_steps, completed=done_steps, loss=float("nan"), rate=0.0
        )

    def step(self, done_steps: int, loss: float, images_per_s: float) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done_steps, loss=loss, rate=images_per_s)

    def epoch(self, record: EpochRecord) -> None:
        self.console.print(
            f"  epoch {record.epoch}: loss {record.loss:.4f}  collapse ratio {record.collapse_ratio:.2f}"
            f"  {record.images_per_s:,.0f} img/s  {record.seconds:.1f}s"
        )

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
