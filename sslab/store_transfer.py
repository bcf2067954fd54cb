"""Copies of a results store: an online SQLite backup, and trials exported to a file and imported into another
store by identity, so that results from a laptop and a cluster merge without duplicates.

The export is JSON lines: a header (`format`, `schema`), one line per trial (its row, its metrics, the studies
it belongs to with its axis values), then one line per study record.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from sslab.errors import SslabError
from sslab.store import (
    SQLITE_BUSY_TIMEOUT_S,
    MetricRow,
    Store,
    StoreError,
    StudyRow,
    StudyTrialRow,
    TrialRow,
)
from sslab.store_migrations import SCHEMA_VERSION

FORMAT = "sslab-trials"
_TRIAL_COLUMNS = [c.name for c in TrialRow.__table__.columns if c.name != "id"]
_MOVING = ("running",)  # a trial still training elsewhere is not copied


@dataclass(frozen=True)
class ImportResult:
    added: int  # trials new to this store
    replaced: int  # unfinished trials here that the file has finished
    kept: int  # trials this store already had (or had finished)
    skipped: int  # trials still running where they were exported
    studies: int  # study records added


def _sqlite_path(store: Store) -> Path:
    url = make_url(store.url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        raise SslabError(
            "sslab store backup copies SQLite stores; for PostgreSQL use pg_dump, or store export"
        )
    return Path(str(url.database))


def _new_file(target: Path) -> Path:
    if target.exists():
        raise SslabError(f"{target} exists; name a new file (nothing was overwritten)")
    if not target.parent.exists():
        raise SslabError(f"folder {target.parent} does not exist")
    return target.with_name(f".{target.name}.partial")


def backup(store: Store, target: Path) -> Path:
    """A consistent copy of a SQLite store taken while others may be writing it (SQLite's online backup)."""
    source = _sqlite_path(store)
    partial = _new_file(target)
    try:
        with (
            contextlib.closing(
                sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
            ) as reading,
            contextlib.closing(sqlite3.connect(partial)) as writing,
        ):
            reading.backup(writing)
        os.replace(partial, target)
    except (OSError, sqlite3.Error) as exc:
        partial.unlink(missing_ok=True)
        raise SslabError(f"cannot back up {source} to {target}: {exc}") from None
    return target


def _value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _lines(store: Store, study: str | None) -> Iterator[dict[str, Any]]:
    with store.session() as session:
        members = list(session.scalars(select(StudyTrialRow)))
        studies = list(session.scalars(select(StudyRow)))
        query = select(TrialRow).order_by(TrialRow.id)
        if study is not None:
            wanted = {m.config_hash for m in members if m.study == study}
            if not any(s.name == study for s in studies):
                raise SslabError(f"no study '{study}' in {store.url}")
            query = query.where(TrialRow.config_hash.in_(wanted))
            studies = [s for s in studies if s.name == study]
            members = [m for m in members if m.study == study]
        trials = list(session.scalars(query))
        metrics: dict[int, list[list[Any]]] = {}
        for row in session.scalars(select(MetricRow)):
            metrics.setdefault(row.trial_id, []).append([row.name, row.value, row.epoch])
    by_hash: dict[str, list[list[Any]]] = {}
    for member in members:
        by_hash.setdefault(member.config_hash, []).append([member.study, member.axes])
    yield {"format": FORMAT, "schema": SCHEMA_VERSION}
    for trial in trials:
        yield {
            "trial": {name: _value(getattr(trial, name)) for name in _TRIAL_COLUMNS},
            "metrics": metrics.get(trial.id, []),
            "studies": by_hash.get(trial.config_hash, []),
        }
    for record in studies:
        yield {
            "study": {
                "name": record.name,
                "spec_json": record.spec_json,
                "created_at": _value(record.created_at),
            }
        }


def export_trials(store: Store, target: Path, study: str | None = None) -> int:
    """Write the store's trials (or one study's) to `target`; returns how many trials were written."""
    partial = _new_file(target)
    count = 0
    try:
        with partial.open("w", encoding="utf-8") as handle:
            for line in _lines(store, study):
                count += "trial" in line
                handle.write(json.dumps(line, sort_keys=True) + "\n")
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise SslabError(f"cannot write {target}: {exc.strerror or exc}") from None
    return count


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise SslabError(f"no export file at {path}") from None
    except UnicodeDecodeError:
        raise SslabError(f"{path} is not an sslab export (written by `sslab store export`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SslabError(f"{path} is not an sslab export: {exc}") from None
    if not lines or lines[0].get("format") != FORMAT:
        raise SslabError(f"{path} is not an sslab export (written by `sslab store export`)")
    if lines[0].get("schema") != SCHEMA_VERSION:
        raise SslabError(
            f"{path} was exported from a store of schema {lines[0].get('schema')}, this release's is "
            f"{SCHEMA_VERSION}: import it with the release that exported it, or open that store here first "
            "so that it migrates, and export again"
        )
    return lines[1:]


def _parse(column: str, value: Any) -> Any:
    if value is not None and column.endswith("_at"):
        return datetime.fromisoformat(value)
    return value


def import_trials(store: Store, path: Path) -> ImportResult:
    """Add the exported trials that this store does not have, by identity; in one transaction."""
    lines = _read(path)
    added = replaced = kept = skipped = studies = 0
    try:
        with store.session() as session:
            for line in (item for item in lines if "study" in item):
                if session.get(StudyRow, line["study"]["name"]) is None:
                    session.add(StudyRow(**{k: _parse(k, v) for k, v in line["study"].items()}))
                    studies += 1
            session.flush()
            for line in (item for item in lines if "trial" in item):
                values = {k: _parse(k, v) for k, v in line["trial"].items() if k in _TRIAL_COLUMNS}
                if values["status"] in _MOVING:
                    skipped += 1
                    continue
                existing = session.scalar(
                    select(TrialRow).where(TrialRow.config_hash == values["config_hash"])
                )
                if existing is not None and (existing.status == "done" or values["status"] != "done"):
                    kept += 1
                else:
                    if existing is not None:  # finished there, unfinished here: take the finished one
                        session.delete(existing)
                        session.flush()
                        replaced += 1
                    else:
                        added += 1
                    row = TrialRow(**values)
                    session.add(row)
                    session.flush()
                    session.add_all(
                        MetricRow(trial_id=row.id, name=name, value=value, epoch=epoch)
                        for name, value, epoch in line["metrics"]
                    )
                for study, axes in line["studies"]:
                    member = select(StudyTrialRow).where(
                        StudyTrialRow.study == study, StudyTrialRow.config_hash == values["config_hash"]
                    )
                    if session.get(StudyRow, study) is not None and session.scalar(member) is None:
                        session.add(
                            StudyTrialRow(
                                study=study, config_hash=values["config_hash"], axes_json=json.dumps(axes)
                            )
                        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}: a malformed record ({exc}); nothing was imported") from None
    return ImportResult(added, replaced, kept, skipped, studies)
