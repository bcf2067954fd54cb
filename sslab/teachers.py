"""Naming the teacher of a distillation method: a trial id, a config hash, a pretraining hash or a study cell,
resolved against the results store to the pretraining hash its weights are kept under (`sslab.weights`).

A trial's config stores the pretraining hash, so a student is the same trial however its teacher was named.
Nothing here imports torch, except to look for a weights file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sslab.config import TrialConfig, from_mapping, setting_owners
from sslab.errors import ConfigError
from sslab.store import Store, StoreMissing, TrialRow

HASH = re.compile(r"^[0-9a-f]{16}$")  # a config hash or a pretraining hash
SETTING = "teacher"  # the setting that names a distillation method's teacher
TRAIN_FIRST = "train the teacher first: sslab run --method simclr --backbone resnet18 ..."


def _weights_path(pretraining_hash: str) -> Path:
    from sslab import weights  # imports torch: only when a teacher is named

    return weights.path_for(pretraining_hash)


def resolve_teacher(store: Store | None, reference: str) -> str:
    """The pretraining hash of the finished trial that `reference` names, or a one-line ConfigError.

    `reference` is a trial id ("12"), a trial's config hash, a pretraining hash whose weights are kept, or a
    study cell "STUDY:axis=value,axis=value" (seed included where the study has several). `store` may be
    None only for a pretraining hash.
    """
    reference = reference.strip()
    if HASH.match(reference) and _weights_path(reference).exists():
        return reference
    if store is None:
        raise ConfigError(f"teacher {reference}: there is no results store to look it up in; {TRAIN_FIRST}")
    if reference.isdigit():
        with store.session() as session:
            row = session.get(TrialRow, int(reference))
        if row is None:
            raise ConfigError(f"teacher {reference}: no trial {reference} in {store.url}; {TRAIN_FIRST}")
    elif HASH.match(reference):
        row = store.find(reference)
        if row is None:
            raise ConfigError(
                f"teacher {reference}: neither a trial's config hash in {store.url} nor kept weights "
                f"({_weights_path(reference)}); {TRAIN_FIRST}"
            )
    elif ":" in reference:
        row = _study_cell(store, reference)
    else:
        raise ConfigError(
            f"teacher {reference!r}: give a trial id, a config hash, a pretraining hash or STUDY:axis=value"
        )
    return _finished(row, reference)


def _finished(row: TrialRow, reference: str) -> str:
    if row.status != "done":
        raise ConfigError(
            f"teacher {reference}: trial {row.id} is {row.status}, not done; finish it first "
            "(sslab run ... --resume, or sslab study run STUDY)"
        )
    config = from_mapping(row.config, source=f"teacher trial {row.id}", other_methods="ignore")
    pretraining_hash = config.pretraining_hash()
    path = _weights_path(pretraining_hash)
    if not path.exists():
        raise ConfigError(
            f"teacher {reference}: trial {row.id} is done but its weights are not kept ({path}): run its "
            "config again with --force to keep them, or point SSLAB_WEIGHTS_DIR at where they are"
        )
    return pretraining_hash


def _study_cell(store: Store, reference: str) -> TrialRow:
    study, _, cell = reference.partition(":")
    frame = store.study_frame(study)
    if frame.empty:
        names = ", ".join(s.name for s in store.studies()) or "none yet"
        raise ConfigError(
            f"teacher {reference}: no study '{study}' in {store.url}; recorded studies: {names}"
        )
    axes = [str(c)[len("axis.") :] for c in frame.columns if str(c).startswith("axis.")]
    for part in filter(None, (p.strip() for p in cell.split(","))):
        axis, sep, value = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in axes:
            raise ConfigError(
                f"teacher {reference}: {part!r} is not axis=value; the study's axes: {', '.join(axes)}"
            )
        frame = frame[[_same(v, value.strip()) for v in frame[f"axis.{axis}"]]]
    if len(frame) != 1:
        found = "no trial" if frame.empty else f"{len(frame)} trials"
        raise ConfigError(
            f"teacher {reference}: {found} of study {study} at these values; name one cell "
            f"(axes: {', '.join(axes)})"
        )
    config_hash = str(frame.iloc[0]["hash"])
    row = store.find(config_hash)
    if row is None:
        raise ConfigError(
            f"teacher {reference}: its trial {config_hash} has not started; sslab study run {study}"
        )
    return row


def _same(value: Any, text: str) -> bool:
    """Whether an axis value read from the store is the one spelled `text` on the command line."""
    if str(value) == text or str(value).lower() == text.lower():
        return True
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return False


def with_teacher(config: TrialConfig, store: Store) -> TrialConfig:
    """`config` with its teacher (if its method has one) named by its pretraining hash."""
    if SETTING not in config.settings:
        return config
    reference = str(config.settings[SETTING])
    if not reference:
        raise ConfigError(
            f"{config.method} needs --set {config.method}.teacher=... (a finished trial's id, config hash, "
            "pretraining hash or STUDY:axis=value cell)"
        )
    resolved = resolve_teacher(store, reference)
    return config if resolved == reference else config.replace(**{SETTING: resolved})


def resolve_overrides(overrides: Mapping[str, Any], db: str | None) -> dict[str, Any]:
    """Study overrides (`--set`) with every teacher named by its pretraining hash; the store at `db` is opened
    only if a teacher needs looking up."""
    keys = {SETTING, *(f"{method}.{SETTING}" for method in setting_owners(SETTING))}
    named = {key: str(value) for key, value in overrides.items() if key in keys and str(value).strip()}
    if not named:
        return dict(overrides)
    try:
        store: Store | None = Store(db, create=False)
    except StoreMissing:
        store = None
    return {**overrides, **{key: resolve_teacher(store, value) for key, value in named.items()}}
