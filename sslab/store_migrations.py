"""Schema migrations of the results store, run when a store written by an older release is opened.

- Schema 0 (no `sslab_meta` table): a trial's hash covered every config field as spelled, and its config was
  one flat record of all fields of every method.
- Schema 1: trial identities are canonical (`TrialConfig.identity`): each trial's hash is recomputed from its
  stored config, study memberships and claims follow it, and trials that turn out to be one trial under the
  new rules are reported and kept apart (`duplicate_of`), never merged.
- Schema 2: each trial records the CPU threads it ran with (`threads`; unknown for older trials).
- Schema 3: each worker records its scheduler job (`job`, e.g. a SLURM array task).
- Schema 4: a trial that evaluated another's kept weights instead of pretraining names it (`pretrained_from`);
  random-init baselines are stored once (`sslab_baselines`, created with the other tables).
- Schema 5: each trial records the precision it computed in (`precision`: fp32, bf16 or fp16), since
  `--precision auto` picks by hardware; unknown for older trials.

Migrations use plain SQL on one connection inside the caller's transaction, so that a failure leaves the store
as it was; a lock taken first makes concurrent openers wait and then find the work done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from sslab.errors import ConfigError, SslabError
from sslab.store_lookup import SCHEMA_VERSION


@dataclass
class Migration:
    """What a migration did, for the user to read."""

    from_version: int
    to_version: int
    rehashed: int = 0
    duplicates: list[tuple[str, list[int]]] = field(
        default_factory=list
    )  # (identity, trial ids; first holds it)
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (trial id, why)
    notes: list[str] = field(default_factory=list)


def stored_version(connection: Connection) -> int | None:
    row = connection.execute(text("SELECT value FROM sslab_meta WHERE key = 'schema_version'")).first()
    return None if row is None else int(row[0])


def _lock(connection: Connection) -> None:
    """Serialise migrating processes: a write on SQLite takes the database's write lock."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("LOCK TABLE sslab_meta IN EXCLUSIVE MODE"))
    else:
        connection.execute(text("DELETE FROM sslab_meta WHERE key = 'migration_lock'"))


def _set_version(connection: Connection, version: int) -> None:
    connection.execute(text("DELETE FROM sslab_meta WHERE key = 'schema_version'"))
    connection.execute(
        text("INSERT INTO sslab_meta (key, value) VALUES ('schema_version', :v)"), {"v": str(version)}
    )


def migrate(connection: Connection, target: int = SCHEMA_VERSION) -> Migration | None:
    """Bring the store to schema `target`; None when there was nothing to do."""
    version = stored_version(connection)
    if version is not None and version > target:
        raise SslabError(
            f"the results store has schema {version}, newer than this release's {target}; upgrade sslab"
        )
    if version == target:
        return None
    _lock(connection)
    version = stored_version(connection)  # another process may have migrated it meanwhile
    if version == target:
        return None
    trials = connection.execute(text("SELECT COUNT(*) FROM sslab_trials")).scalar_one()
    if version is None and not trials:  # a new store
        _set_version(connection, target)
        return None
    result = Migration(version or 0, target)
    if result.from_version < 1:
        _canonical_identities(connection, result)
    if result.from_version < 2:
        _add_column(connection, "sslab_trials", "threads", "INTEGER")
    if result.from_version < 3:
        _add_column(connection, "sslab_workers", "job", "VARCHAR(64)")
    if result.from_version < 4:
        _add_column(connection, "sslab_trials", "pretrained_from", "VARCHAR(32)")
    if result.from_version < 5:
        _add_column(connection, "sslab_trials", "precision", "VARCHAR(8)")
    _set_version(connection, target)
    summary = f"results store migrated from schema {result.from_version} to {target}"
    if result.from_version < 1:
        summary += f": {result.rehashed} trial(s) re-identified under the canonical trial identity"
    result.notes.insert(0, summary)
    return result


def _add_column(connection: Connection, table: str, column: str, kind: str) -> None:
    if column not in {c["name"] for c in inspect(connection).get_columns(table)}:
        connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))


def _canonical_identities(connection: Connection, result: Migration) -> None:
    """Schema 0 -> 1: recompute every trial's hash from its stored config."""
    from sslab.config import from_mapping

    _add_column(connection, "sslab_trials", "duplicate_of", "VARCHAR(32)")
    rows = connection.execute(
        text("SELECT id, config_hash, config_json, status FROM sslab_trials ORDER BY id")
    ).all()
    groups: dict[str, list[tuple[int, str, str, dict[str, Any]]]] = {}
    for trial_id, old_hash, config_json, status in rows:
        try:
            # Schema-0 trials were computed by the first behaviour of every method.
            record = {"method_version": 1, "pipeline_version": 1, **json.loads(config_json)}
            config = from_mapping(record, f"trial {trial_id}", other_methods="ignore")
        except (ConfigError, ValueError) as exc:
            result.unreadable.append((trial_id, str(exc).splitlines()[0]))
            continue
        groups.setdefault(config.hash(), []).append((trial_id, old_hash, status, config.record()))
    new_hash_of: dict[str, str] = {}
    for new_hash, members in groups.items():
        holder = next((m for m in members if m[2] == "done"), members[0])
        for trial_id, old_hash, _, record in members:
            is_holder = trial_id == holder[0]
            connection.execute(
                text(
                    "UPDATE sslab_trials SET config_hash = :hash, config_json = :json, duplicate_of = :dup "
                    "WHERE id = :id"
                ),
                {
                    "hash": new_hash if is_holder else old_hash,
                    "json": json.dumps(record, sort_keys=True),
                    "dup": None if is_holder else new_hash,
                    "id": trial_id,
                },
            )
            new_hash_of[old_hash] = new_hash
            result.rehashed += is_holder
        if len(members) > 1:
            ids = [holder[0], *(m[0] for m in members if m[0] != holder[0])]
            result.duplicates.append((new_hash, ids))
    _follow(connection, "sslab_study_trials", ("study", "config_hash"), new_hash_of)
    _follow(connection, "sslab_claims", ("config_hash",), new_hash_of)
    connection.execute(text("UPDATE sslab_workers SET config_hash = NULL"))
    for identity, ids in result.duplicates:
        others = ", ".join(str(i) for i in ids[1:])
        result.notes.append(
            f"trials {ids[0]} and {others} are one trial under the canonical identity {identity}: "
            f"trial {ids[0]} holds it; {others} {'is' if len(ids) == 2 else 'are'} listed as its duplicate "
            "(column duplicate_of)"
        )
    for trial_id, why in result.unreadable:
        result.notes.append(f"trial {trial_id} keeps its old identity: this release cannot read it ({why})")


def _follow(connection: Connection, table: str, key: tuple[str, ...], new_hash_of: dict[str, str]) -> None:
    """Point rows of `table` at the new hashes; a row that would repeat a key (a duplicate) is dropped."""
    id_column = "id" if table == "sslab_study_trials" else "config_hash"
    rows = connection.execute(text(f"SELECT {id_column}, {', '.join(key)} FROM {table}")).all()
    taken = {tuple(row[1:]) for row in rows if row[-1] not in new_hash_of}
    for row in rows:
        row_id, values = row[0], tuple(row[1:])
        new = new_hash_of.get(values[-1])
        if new is None:
            continue
        new_key = (*values[:-1], new)
        if new_key in taken:
            connection.execute(text(f"DELETE FROM {table} WHERE {id_column} = :id"), {"id": row_id})
            continue
        taken.add(new_key)
        connection.execute(
            text(f"UPDATE {table} SET config_hash = :new WHERE {id_column} = :id"), {"new": new, "id": row_id}
        )
