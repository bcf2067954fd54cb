"""How the signal tests start a command: as a terminal would, whatever the test runner inherited."""

from __future__ import annotations

import signal


def as_from_a_terminal() -> None:
    """`preexec_fn` for Popen: SIGINT back at its default. A test runner started in the background (`&` from
    a script, as some CI launchers do) inherits SIGINT ignored and passes that on, and a command started
    with SIGINT ignored rightly keeps ignoring it, so Ctrl-C tests would see their signal dropped."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
