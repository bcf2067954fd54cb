"""A done trial's final metrics, read from a SQLite results store with the standard library alone.

`sslab run` asks here first, so that a command whose trial is already done answers without importing
SQLAlchemy, pandas or torch. Whatever it cannot answer for certain (another database, a store of another
schema, a file it cannot open read-only, a trial not done) is None, and `sslab.store.Store` takes over.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SCHEMA_VERSION = 5  # the results store's schema (sslab.store_migrations lists what each version added)
_SQLITE_PREFIX = "sqlite:///"
DEFAULT_DB = "sqlite:///results/sslab.db"


def resolve_url(url: str | None) -> str:
    """The store a command uses: `url`, else $SSLAB_DB, else results/sslab.db."""
    return url or os.environ.get("SSLAB_DB") or DEFAULT_DB


@dataclass(frozen=True)
class DoneTrial:
    id: int
    config_hash: str
    collapsed: bool | None
    wall_time_s: float | None
    metrics: dict[str, float]


def sqlite_file(url: str) -> Path | None:
    """The file of a plain `sqlite:///PATH` URL; None for any other URL (drivers, query options, memory)."""
    if not url.startswith(_SQLITE_PREFIX) or "?" in url:
        return None
    path = url[len(_SQLITE_PREFIX) :]
    return Path(path) if path and path != ":memory:" else None


def done_trial(url: str, config_hash: str) -> DoneTrial | None:
    """The trial `config_hash` if the store at `url` holds it done, else (or when unsure) None."""
    path = sqlite_file(url)
    if path is None or not path.is_file():
        return None
    try:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=1.0)) as db:
            if db.execute("PRAGMA quick_check(1)").fetchone() != ("ok",):
                return None  # damaged: the full store says so, in one line
            version = db.execute("SELECT value FROM sslab_meta WHERE key = 'schema_version'").fetchone()
            if version is None or int(version[0]) != SCHEMA_VERSION:
                return None  # older: the full store migrates it first
            row = db.execute(
                "SELECT id, status, collapsed, wall_time_s FROM sslab_trials WHERE config_hash = ?",
                (config_hash,),
            ).fetchone()
            if row is None or row[1] != "done":
                return None
            metrics = db.execute(
                "SELECT name, value FROM sslab_metrics WHERE trial_id = ? AND epoch IS NULL", (row[0],)
            ).fetchall()
    except (sqlite3.Error, ValueError, OSError):  # damaged, locked, unreadable: the full store explains
        return None
    collapsed = None if row[2] is None else bool(row[2])
    return DoneTrial(int(row[0]), config_hash, collapsed, row[3], {str(k): float(v) for k, v in metrics})
