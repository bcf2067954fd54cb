"""Claiming a trial by its identity, so that no two processes train it at once, kept alive by a heartbeat.

A claim names its holder `host:pid:token`. It is live while its heartbeat is younger than the timeout and,
on this host, while its process exists; a trial recorded as running without a live claim was left by a process
that stopped: it is shown as `stale` and can be resumed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

from sslab.errors import SslabError
from sslab.store import HEARTBEAT_TIMEOUT, Store, is_live, pid_alive

__all__ = ["HEARTBEAT_TIMEOUT", "ClaimHeartbeat", "holding", "is_live", "new_worker_id", "pid_alive"]


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ClaimHeartbeat(threading.Thread):
    """Marks a holder's claims (and its worker record) alive every `interval` seconds."""

    def __init__(self, store: Store, worker: str, interval: float) -> None:
        super().__init__(daemon=True, name="sslab-heartbeat")
        self.store, self.worker, self.interval = store, worker, interval
        self.current: str | None = None  # the config hash of the trial being run
        self._stopping = threading.Event()

    def beat(self) -> None:
        with contextlib.suppress(Exception):  # a database hiccup: the next beat tries again
            self.store.heartbeat(self.worker, self.current)

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)


@contextlib.contextmanager
def holding(store: Store, config_hash: str, timeout: float = HEARTBEAT_TIMEOUT) -> Iterator[str]:
    """Hold the claim on a trial while the block runs; a one-line error if a live process holds it."""
    worker = new_worker_id()
    if not store.claim_trial(config_hash, worker, timeout):
        holder = store.claims([config_hash]).get(config_hash)
        if is_live(holder, timeout) or not store.claim_trial(config_hash, worker, 0.0):
            assert holder is not None
            age = (_now() - holder.heartbeat_at).total_seconds()
            raise SslabError(
                f"trial {config_hash} is being trained by another process ({holder.worker}, last heartbeat "
                f"{age:.0f} s ago); wait for it to finish, or stop that process first"
            )
    heartbeat = ClaimHeartbeat(store, worker, max(0.1, timeout / 6))
    heartbeat.current = config_hash
    heartbeat.start()
    try:
        yield worker
    finally:
        heartbeat.stop()
        store.release_trial(config_hash, worker)
