"""The results store: trials (full config, hash, status, provenance) and their metrics, in any SQL database.

SQLite at results/sslab.db by default (WAL mode, so several processes can write at once); any SQLAlchemy
URL (e.g. postgresql+psycopg://...) via --db or SSLAB_DB. Tables are prefixed `sslab_` so that Optuna's own
tables (`trials`, `studies`, ...) can live in the same database.

The store has a schema version (`sslab_meta`) and migrates itself when opened by a newer release (`migrate`):
every trial keeps its full config, so its identity under the current rules can always be recomputed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sslab.config import TrialConfig
from sslab.errors import SslabError
from sslab.store_lookup import resolve_url
from sslab.store_migrations import SCHEMA_VERSION, Migration, migrate, stored_version

if TYPE_CHECKING:  # pandas takes half a second to import: only the frames need it
    import pandas as pd


class StoreError(SslabError):
    """The results store cannot be opened or written."""


class StoreMissing(StoreError):
    """There is no results store at the given path yet."""


class StoreWarning(UserWarning):
    """Something about the store the user should know (e.g. what a migration changed)."""


class Base(DeclarativeBase):
    pass


class TrialRow(Base):
    __tablename__ = "sslab_trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    config_hash: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    method: Mapped[str] = mapped_column(String(64), index=True)
    dataset: Mapped[str] = mapped_column(String(256))
    backbone: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # running | done | failed | interrupted
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    collapsed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    wall_time_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    torch_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sslab_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    git_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hostname: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # Set when a migration found this trial to be the same trial as another under the canonical identity:
    # the other holds the identity (`config_hash`), this one keeps its old hash and stays listed.
    duplicate_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)  # torch CPU threads it ran with
    # The trial whose kept weights this one evaluated instead of pretraining (same pretraining identity).
    pretrained_from: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # What the trial computed in (fp32, bf16, fp16); None for trials recorded before schema 5.
    precision: Mapped[str | None] = mapped_column(String(8), nullable=True)

    @property
    def config(self) -> dict[str, Any]:
        """The stored config record: shared fields, `method_version` and the method's `settings`."""
        return json.loads(self.config_json)


class MetaRow(Base):
    """Facts about the store itself, such as its schema version."""

    __tablename__ = "sslab_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class MetricRow(Base):
    __tablename__ = "sslab_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("sslab_trials.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: a final metric


class BaselineRow(Base):
    """The random-init probe of one (data, backbone, seed, probe settings), computed once for every trial."""

    __tablename__ = "sslab_baselines"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)  # sslab.runner.baseline_hash
    metrics_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class StudyRow(Base):
    """A study: its name and the full study spec it was run from (JSON)."""

    __tablename__ = "sslab_studies"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class StudyTrialRow(Base):
    """Membership of a trial (by config hash) in a study, with the trial's values on the study's axes."""

    __tablename__ = "sslab_study_trials"
    __table_args__ = (UniqueConstraint("study", "config_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study: Mapped[str] = mapped_column(ForeignKey("sslab_studies.name", ondelete="CASCADE"), index=True)
    config_hash: Mapped[str] = mapped_column(String(32), index=True)
    axes_json: Mapped[str] = mapped_column(Text)  # {"axis name": value, ...}, seed included

    @property
    def axes(self) -> dict[str, Any]:
        return json.loads(self.axes_json)


class ClaimRow(Base):
    """Which study worker runs a trial (by config hash); claimed atomically so no trial runs twice."""

    __tablename__ = "sslab_claims"

    config_hash: Mapped[str] = mapped_column(String(32), primary_key=True)
    worker: Mapped[str | None] = mapped_column(String(160), nullable=True)  # None: released
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer)  # how many times a worker has started the trial


class WorkerRow(Base):
    """A live (or lately live) study worker process and the trial it is running."""

    __tablename__ = "sslab_workers"

    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    study: Mapped[str] = mapped_column(String(128))
    config_hash: Mapped[str | None] = mapped_column(String(32), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    job: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the scheduler's job id (SLURM)


@dataclass(frozen=True)
class Provenance:
    device: str
    torch_version: str
    sslab_version: str
    git_commit: str | None
    hostname: str
    threads: int | None = (
        None  # CPU threads of the float reductions: results are bit-equal only at equal ones
    )
    precision: str | None = (
        None  # what autocast computed in (fp32, bf16, fp16): `auto` depends on the hardware
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


HEARTBEAT_TIMEOUT = 60.0  # seconds without a heartbeat after which a claim's holder is presumed dead


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(claim: ClaimRow | None, timeout: float = HEARTBEAT_TIMEOUT) -> bool:
    """Whether a claim's holder (`host:pid:token`) is alive: a recent heartbeat and, on this host, a running
    process."""
    if claim is None or claim.worker is None or claim.heartbeat_at < _now() - timedelta(seconds=timeout):
        return False
    host, _, rest = claim.worker.partition(":")
    pid = rest.partition(":")[0]
    return host != socket.gethostname() or not pid.isdigit() or pid_alive(int(pid))


def _has_table(connection: Any, name: str) -> bool:
    return bool(inspect(connection).has_table(name))


SQLITE_BUSY_TIMEOUT_S = 60


def _enable_sqlite_pragmas(engine: Engine, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # First: the switch to WAL waits for other processes' locks (a new store opened by several at
        # once) only as long as this timeout, and the driver's default is 5 s.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def damage(path: Path) -> str | None:
    """What SQLite's quick check finds wrong with the store file (read without writing); None if sound."""
    try:
        uri = _read_only_uri(path)
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
            found = [str(row[0]) for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.OperationalError:  # cannot be opened (or is busy) here: not a sign of damage
        return None
    except sqlite3.DatabaseError as exc:  # not a database at all, or its first page is damaged
        return str(exc)
    return None if found == ["ok"] else "; ".join(found)


def _read_only_uri(path: Path) -> str:
    """SQLite's read-only URI for the file; immutable where its WAL index cannot be opened (a read-only
    folder without the -shm file), which reads the file alone."""
    uri = f"file:{path.resolve()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)) as db:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if "unable to open" in str(exc) or "readonly" in str(exc):
            return uri + "&immutable=1"
    except sqlite3.DatabaseError:
        pass
    return uri


def damaged_message(path: Path, why: str) -> str:
    return (
        f"the results store {path} is damaged ({why.splitlines()[0]}); check it with "
        f'sqlite3 {path} "PRAGMA integrity_check", restore a backup (sslab store backup) '
        "or pass another --db"
    )


def _writable(path: Path) -> bool:
    """Whether this process can write the SQLite file and create its -wal/-shm files beside it."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


class Store:
    """Transactional access to trials and metrics.

    A SQLite store that this process cannot write (a colleague's results on a read-only mount) is opened
    read-only: everything that reads works; anything that writes fails with a one-line error.
    """

    def __init__(self, url: str | None = None, create: bool = True) -> None:
        self.url = resolve_url(url)
        self.read_only = False
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise StoreError(
                f"invalid database URL {self.url!r}; expected e.g. sqlite:///results/sslab.db"
            ) from None
        sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
        engine_url = self.url
        if sqlite_file:
            path = Path(str(parsed.database))
            if path.exists():
                why = damage(path)
                if why is not None:
                    raise StoreError(damaged_message(path, why))
                if not _writable(path):
                    self.read_only = True
                    engine_url = f"sqlite:///{_read_only_uri(path)}&uri=true"
            elif not create:
                raise StoreMissing(f"no results store at {path}; run a trial first or pass --db")
            else:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create the folder for {path}: {exc.strerror}") from None
        try:
            self.engine = create_engine(engine_url, future=True, pool_pre_ping=True)
        except (ArgumentError, ImportError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot open database {self.url!r}: {str(exc).splitlines()[0]}") from None
        if parsed.get_backend_name() == "sqlite":
            _enable_sqlite_pragmas(self.engine, wal=not self.read_only)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.migration: Migration | None = None
        if self.read_only:
            self._check_readable()
            return
        self._create_tables()
        self.migration = self._migrate()

    def _check_readable(self) -> None:
        """A read-only store is used as it is: it must have a current schema (nothing can migrate it)."""
        try:
            with self.engine.connect() as connection:
                version = stored_version(connection) if _has_table(connection, "sslab_meta") else None
                if not _has_table(connection, "sslab_trials"):
                    raise StoreError(f"{self.url} is read-only and holds no sslab results")
        except SQLAlchemyError as exc:
            first_line = str(exc.orig if hasattr(exc, "orig") else exc).splitlines()[0]
            raise StoreError(f"cannot read the store {self.url}: {first_line}") from None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"the read-only store {self.url} has schema {version or 0}, this release reads schema "
                f"{SCHEMA_VERSION}: open it once where it is writable (or copy it) so that it migrates"
            )

    def _migrate(self) -> Migration | None:
        """Bring an older store to SCHEMA_VERSION (once, whichever process gets there first)."""
        try:
            with self.engine.begin() as connection:
                result = migrate(connection, SCHEMA_VERSION)
        except SQLAlchemyError as exc:
            first_line = str(exc).splitlines()[0]
            raise StoreError(f"cannot migrate the store {self.url}: {first_line}") from None
        if result is not None and result.notes:
            for note in result.notes:
                warnings.warn(note, StoreWarning, stacklevel=3)
        return result

    def _create_tables(self, attempts: int = 5) -> None:
        """Create missing tables; processes opening a new store at once may race, so retry on 'exists'."""
        for attempt in range(attempts):
            try:
                Base.metadata.create_all(self.engine)
                return
            except SQLAlchemyError as exc:
                message = str(exc)
                racing = "already exists" in message or "duplicate" in message.lower()
                if not racing or attempt == attempts - 1:
                    first_line = message.splitlines()[0]
                    raise StoreError(f"cannot open database {self.url!r}: {first_line}") from None
                time.sleep(0.05 * (attempt + 1))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except IntegrityError:  # a constraint the caller relies on (e.g. the unique claim): theirs to handle
            session.rollback()
            raise
        except DatabaseError as exc:
            session.rollback()
            message = str(exc.orig).splitlines()[0]
            if self.read_only and "readonly" in message.replace("-", "").replace(" ", ""):
                raise StoreError(
                    f"the store {self.url} is read-only: this command would write to it"
                ) from None
            if "malformed" in message or "not a database" in message:
                path = Path(str(make_url(self.url).database))
                raise StoreError(damaged_message(path, message)) from None
            raise StoreError(f"database error on {self.url}: {message}") from None
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # --- writing -------------------------------------------------------------------------------------

    def begin_trial(self, config: TrialConfig, provenance: Provenance) -> int:
        """Record a trial as running (replacing an earlier attempt of the same config); returns its id."""
        now = _now()
        with self.session() as session:
            row = session.scalar(select(TrialRow).where(TrialRow.config_hash == config.hash()))
            if row is None:
                row = TrialRow(config_hash=config.hash(), created_at=now)
                session.add(row)
            else:
                session.execute(delete(MetricRow).where(MetricRow.trial_id == row.id))
            row.method, row.dataset, row.backbone = config.method, config.dataset, config.backbone
            row.config_json = json.dumps(config.record(), sort_keys=True)
            row.status, row.reason, row.collapsed = "running", None, None
            row.started_at, row.heartbeat_at, row.finished_at, row.wall_time_s = now, now, None, None
            row.device, row.torch_version = provenance.device, provenance.torch_version
            row.sslab_version, row.git_commit = provenance.sslab_version, provenance.git_commit
            row.hostname, row.threads = provenance.hostname, provenance.threads
            row.precision = provenance.precision
            row.pretrained_from = None
            session.flush()
            return row.id

    def baseline(self, key: str) -> dict[str, float] | None:
        """The stored random-init baseline under `key`, or None."""
        with self.session() as session:
            row = session.get(BaselineRow, key)
            return None if row is None else dict(json.loads(row.metrics_json))

    def save_baseline(self, key: str, metrics: Mapping[str, float]) -> None:
        """Store a baseline; one computed meanwhile by another process under the same key is kept."""
        try:
            with self.session() as session:
                if session.get(BaselineRow, key) is None:
                    session.add(
                        BaselineRow(key=key, metrics_json=json.dumps(dict(metrics)), created_at=_now())
                    )
        except IntegrityError:
            pass

    def set_pretrained_from(self, trial_id: int, config_hash: str) -> None:
        with self.session() as session:
            row = session.get(TrialRow, trial_id)
            if row is not None:
                row.pretrained_from = config_hash

    def log_metrics(self, trial_id: int, metrics: Mapping[str, float], epoch: int | None = None) -> None:
        with self.session() as session:
            session.add_all(
                MetricRow(trial_id=trial_id, name=name, value=float(value), epoch=epoch)
                for name, value in metrics.items()
            )
            row = session.get(TrialRow, trial_id)
            if row is not None:
                row.heartbeat_at = _now()

    def finish_trial(
        self,
        trial_id: int,
        status: str,
        reason: str | None = None,
        collapsed: bool | None = None,
        wall_time_s: float | None = None,
    ) -> None:
        with self.session() as session:
            row = session.get(TrialRow, trial_id)
            if row is None:
                raise StoreError(f"trial {trial_id} is not in {self.url}")
            row.status, row.reason, row.collapsed = status, reason, collapsed
            row.finished_at, row.wall_time_s = _now(), wall_time_s

    # --- reading -------------------------------------------------------------------------------------

    def find(self, config_hash: str) -> TrialRow | None:
        with self.session() as session:
            return session.scalar(select(TrialRow).where(TrialRow.config_hash == config_hash))

    def trials(self) -> list[TrialRow]:
        with self.session() as session:
            return list(session.scalars(select(TrialRow).order_by(TrialRow.id)))

    def metrics(self, trial_id: int) -> list[MetricRow]:
        with self.session() as session:
            return list(session.scalars(select(MetricRow).where(MetricRow.trial_id == trial_id)))

    def final_metrics(self, trial_id: int) -> dict[str, float]:
        return {m.name: m.value for m in self.metrics(trial_id) if m.epoch is None}

    # --- studies -------------------------------------------------------------------------------------

    def register_study(self, name: str, spec: Mapping[str, Any]) -> None:
        """Create or update a study's record (its spec may grow: new seeds or axis values)."""
        for attempt in range(3):  # the jobs of an array start together: one creates, the others update
            try:
                with self.session() as session:
                    row = session.get(StudyRow, name)
                    if row is None:
                        spec_json = json.dumps(spec, sort_keys=True)
                        session.add(StudyRow(name=name, spec_json=spec_json, created_at=_now()))
                    else:
                        row.spec_json = json.dumps(spec, sort_keys=True)
                return
            except IntegrityError:
                if attempt == 2:
                    raise StoreError(f"cannot record study {name} in {self.url}: it keeps changing") from None

    def add_study_trial(self, study: str, config_hash: str, axes: Mapping[str, Any]) -> None:
        """Record that `config_hash` belongs to `study` at these axis values (idempotent)."""
        try:
            self._add_study_trial(study, config_hash, axes)
        except IntegrityError:  # another process recorded it at the same moment
            self._add_study_trial(study, config_hash, axes)

    def _add_study_trial(self, study: str, config_hash: str, axes: Mapping[str, Any]) -> None:
        with self.session() as session:
            row = session.scalar(
                select(StudyTrialRow).where(
                    StudyTrialRow.study == study, StudyTrialRow.config_hash == config_hash
                )
            )
            if row is None:
                session.add(
                    StudyTrialRow(study=study, config_hash=config_hash, axes_json=json.dumps(dict(axes)))
                )
            else:
                row.axes_json = json.dumps(dict(axes))

    def studies(self) -> list[StudyRow]:
        with self.session() as session:
            return list(session.scalars(select(StudyRow).order_by(StudyRow.name)))

    def study_frame(self, study: str) -> pd.DataFrame:
        """results_frame() restricted to the study's trials, with one column per study axis (prefix `axis.`).

        Trials of the study that have not started yet appear with status `pending`.
        """
        import pandas as pd

        with self.session() as session:
            members = list(session.scalars(select(StudyTrialRow).where(StudyTrialRow.study == study)))
        if not members:
            return pd.DataFrame()
        results = self.results_frame(hashes={m.config_hash for m in members})
        by_hash = results.set_index("hash").to_dict("index") if not results.empty else {}
        rows = []
        for member in members:
            row = {"hash": member.config_hash, "status": "pending", **by_hash.get(member.config_hash, {})}
            row.update({f"axis.{name}": value for name, value in member.axes.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def study(self, name: str) -> StudyRow | None:
        with self.session() as session:
            return session.get(StudyRow, name)

    def keep_study_trials(self, study: str, hashes: Iterable[str]) -> None:
        """Keep only these of a study's membership records (a grid's cells; a trial of a method's older
        behaviour is left in the store, out of the study that now has the new one)."""
        with self.session() as session:
            session.execute(
                delete(StudyTrialRow).where(
                    StudyTrialRow.study == study, StudyTrialRow.config_hash.not_in(list(hashes))
                )
            )

    def forget_study_trials(self, study: str) -> None:
        """Drop a study's membership records (the trials themselves stay in the store)."""
        with self.session() as session:
            session.execute(delete(StudyTrialRow).where(StudyTrialRow.study == study))

    def statuses(self, hashes: Iterable[str]) -> dict[str, str]:
        """Status of each config hash that has a trial row (hashes never run are left out)."""
        wanted = list(hashes)
        found: dict[str, str] = {}
        with self.session() as session:
            for start in range(0, len(wanted), 500):
                query = select(TrialRow.config_hash, TrialRow.status).where(
                    TrialRow.config_hash.in_(wanted[start : start + 500])
                )
                found.update({config_hash: status for config_hash, status in session.execute(query)})
        return found

    # --- claims and workers (study scheduling) --------------------------------------------------------

    def claim_trial(self, config_hash: str, worker: str, stale_after_s: float) -> int:
        """Claim a trial for `worker`; returns the attempt number (1 = first run), or 0 when another live
        worker holds it. Atomic: of concurrent claimers exactly one wins (unique insert, or a conditional
        update whose row count decides)."""
        now = _now()
        try:
            with self.session() as session:
                session.add(ClaimRow(config_hash=config_hash, worker=worker, heartbeat_at=now, attempts=1))
            return 1
        except IntegrityError:
            pass
        cutoff = now - timedelta(seconds=stale_after_s)
        with self.session() as session:
            free = ClaimRow.worker.is_(None) | (ClaimRow.worker == worker) | (ClaimRow.heartbeat_at < cutoff)
            result = cast(  # an UPDATE gives a CursorResult, which has the matched row count
                "CursorResult[Any]",
                session.execute(
                    update(ClaimRow)
                    .where(ClaimRow.config_hash == config_hash, free)
                    .values(worker=worker, heartbeat_at=now, attempts=ClaimRow.attempts + 1)
                    .execution_options(synchronize_session=False)
                ),
            )
            if result.rowcount != 1:
                return 0
            attempts = session.scalar(select(ClaimRow.attempts).where(ClaimRow.config_hash == config_hash))
            return int(cast(int, attempts))  # the row was just updated

    def release_trial(self, config_hash: str, worker: str) -> None:
        with self.session() as session:
            session.execute(
                update(ClaimRow)
                .where(ClaimRow.config_hash == config_hash, ClaimRow.worker == worker)
                .values(worker=None)
                .execution_options(synchronize_session=False)
            )

    def claims(self, hashes: Iterable[str]) -> dict[str, ClaimRow]:
        wanted = list(hashes)
        found: dict[str, ClaimRow] = {}
        with self.session() as session:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = session.scalars(select(ClaimRow).where(ClaimRow.config_hash.in_(chunk)))
                found.update({row.config_hash: row for row in rows})
        return found

    def register_worker(self, worker: str, host: str, pid: int, study: str, job: str | None = None) -> None:
        now = _now()
        with self.session() as session:
            session.merge(
                WorkerRow(
                    id=worker, host=host, pid=pid, study=study, started_at=now, heartbeat_at=now, job=job
                )
            )

    def heartbeat(self, worker: str, config_hash: str | None) -> None:
        """Mark `worker` and the claims it holds as alive."""
        now = _now()
        with self.session() as session:
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.id == worker)
                .values(heartbeat_at=now, config_hash=config_hash)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                update(ClaimRow)
                .where(ClaimRow.worker == worker)
                .values(heartbeat_at=now)
                .execution_options(synchronize_session=False)
            )

    def expire_worker(self, worker: str) -> None:
        """Declare a worker dead now (its process is known to be gone): its claims become free to take."""
        long_ago = datetime(1970, 1, 1)
        with self.session() as session:
            for table in (WorkerRow, ClaimRow):
                key = table.id if table is WorkerRow else cast(type[ClaimRow], table).worker
                session.execute(
                    update(table)
                    .where(key == worker)
                    .values(heartbeat_at=long_ago)
                    .execution_options(synchronize_session=False)
                )

    def remove_worker(self, worker: str) -> None:
        with self.session() as session:
            session.execute(delete(WorkerRow).where(WorkerRow.id == worker))

    def workers(self, study: str | None = None) -> list[WorkerRow]:
        with self.session() as session:
            query = select(WorkerRow).order_by(WorkerRow.started_at)
            if study is not None:
                query = query.where(WorkerRow.study == study)
            return list(session.scalars(query))

    def results_frame(self, hashes: set[str] | None = None) -> pd.DataFrame:
        """One row per trial: identity, status, provenance, every config field and every final metric."""
        import pandas as pd

        with self.session() as session:
            query = select(TrialRow).order_by(TrialRow.id)
            if hashes is not None:
                query = query.where(TrialRow.config_hash.in_(hashes))
            trials = list(session.scalars(query))
            finals = session.execute(
                select(MetricRow.trial_id, MetricRow.name, MetricRow.value).where(MetricRow.epoch.is_(None))
            ).all()
        by_trial: dict[int, dict[str, float]] = {}
        for trial_id, name, value in finals:
            by_trial.setdefault(trial_id, {})[name] = value
        running = self.claims(t.config_hash for t in trials if t.status == "running")
        rows = []
        for trial in trials:
            status = trial.status
            if status == "running" and not is_live(running.get(trial.config_hash)):
                status = "stale"  # left running by a process that stopped: resume it with --resume
            rows.append(
                {
                    "id": trial.id,
                    "hash": trial.config_hash,
                    "status": status,
                    "collapsed": trial.collapsed,
                    "reason": trial.reason,
                    "wall_time_s": trial.wall_time_s,
                    "device": trial.device,
                    "threads": trial.threads,
                    "precision_used": trial.precision,
                    "finished_at": trial.finished_at.isoformat() if trial.finished_at else None,
                    "duplicate_of": trial.duplicate_of,
                    **flat_record(trial.config),
                    **by_trial.get(trial.id, {}),
                }
            )
        return pd.DataFrame(rows)


def flat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config record as one level of columns: shared fields, then the method's settings by name, and
    `older_behaviour` when the trial ran an older version of its method, or of the shared pipeline, than this
    release has."""
    from sslab.methods.catalog import methods
    from sslab.pipeline import PIPELINE_VERSION, effective_version

    flat = {k: v for k, v in record.items() if k not in ("settings", "v")}
    flat.update(record.get("settings", {}))
    info = methods().get(str(record.get("method")))
    version = int(record.get("method_version", 1))
    flat["pipeline_version"] = pipeline = int(record.get("pipeline_version", 1))
    precision = str(record.get("precision", "auto"))
    older_pipeline = effective_version(pipeline, precision) < effective_version(PIPELINE_VERSION, precision)
    flat["older_behaviour"] = (info is not None and version < info.version) or older_pipeline
    return flat
