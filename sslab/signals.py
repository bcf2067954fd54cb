"""Signals as interruptions: SIGTERM (`kill`, `timeout`, a scheduler) stops a command as Ctrl-C does."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (or a scheduler's SIGUSR1 warning): stop like Ctrl-C; trials are recorded as interrupted."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # USR1: SLURM's warning before a job's time limit


def sigterm_as_interrupt() -> Callable[[], None]:
    """Handle SIGTERM and SIGUSR1 like Ctrl-C until the returned function is called (a no-op off the main
    thread)."""
    try:
        previous = {signum: signal.signal(signum, raise_terminated) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals are not ours to handle
        return lambda: None

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    return restore


def interrupt_once(signum: int, frame: Any) -> None:
    """Ctrl-C: stop once, then ignore further SIGINTs (the same Ctrl-C passed on by a parent) while the
    interrupted work records itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def interruptible() -> None:
    """Restore Ctrl-C where the process was started with SIGINT ignored (a shell's background job), and stop
    on SIGTERM the same way, for the rest of the process's life."""
    signal.signal(signal.SIGINT, interrupt_once)
    for signum in STOP_SIGNALS:
        signal.signal(signum, raise_terminated)
