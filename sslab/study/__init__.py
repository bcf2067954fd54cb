"""Studies: sets of trials that differ along named axes, defined in TOML files and run on Optuna."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sslab.study.expand import Cell, StudyPlan, make_plan
from sslab.study.spec import (
    Problems,
    StudySpec,
    find_study,
    load_spec,
    parse_spec,
    study_files,
    with_seeds,
)

__all__ = [
    "Cell",
    "StudyPlan",
    "StudySpec",
    "find_study",
    "load_plan",
    "load_spec",
    "make_plan",
    "parse_spec",
    "study_files",
]


def load_plan(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    stored_name: str | None = None,
    seeds: Sequence[int] | None = None,
) -> StudyPlan:
    """Find, parse and validate a study with its overrides: every problem is reported at once.

    `seeds` replaces the file's replicate seeds (`--seeds`).
    """
    problems = Problems(name)
    spec = load_spec(name, problems)
    if seeds is not None:
        spec = with_seeds(spec, seeds, problems)
    return make_plan(spec, overrides, stored_name, problems)
