"""Signals as interruptions: SIGTERM (`kill`, `timeout`, a scheduler) stops a command as Ctrl-C does."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (trials are recorded as interrupted, workers are told to stop)."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def sigterm_as_interrupt() -> Callable[[], None]:
    """Handle SIGTERM like Ctrl-C until the returned function is called (a no-op off the main thread)."""
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: signals are not ours to handle
        return lambda: None

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore


def interruptible() -> None:
    """Restore Ctrl-C where the process was started with SIGINT ignored (a shell's background job), and stop
    on SIGTERM the same way, for the rest of the process's life."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)
