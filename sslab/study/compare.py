"""`sslab compare A B ...`: a method x seed study on one matched budget, run by the study scheduler.

Every method keeps its own defaults (optimiser, head, settings) except the budget, which is the same for all:
data, backbone, epochs, batch size, image size and training subset. The study is recorded and scheduled like
any other, so its trials dedup and resume by identity; `sslab.report.compare` reads its results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from sslab.config import TrialConfig
from sslab.errors import ConfigError
from sslab.methods.catalog import methods as known_methods
from sslab.study.expand import StudyPlan, make_plan
from sslab.study.spec import Axis, StudySpec

BUDGET_FIELDS = ("dataset", "backbone", "epochs", "batch_size", "image_size", "train_subset")
SET_BY_COMPARE = ("method", "seed")


def study_name(methods: Sequence[str]) -> str:
    return "compare-" + "-".join(methods)


def compare_spec(methods: Sequence[str], seeds: Sequence[int], name: str | None = None) -> StudySpec:
    """The study behind a comparison: axis `method`, the replicate seeds, the budget fixed in its base."""
    if len(methods) < 2:
        raise ConfigError("compare needs two or more methods, e.g. `sslab compare simclr byol`")
    if len(set(methods)) < len(methods):
        raise ConfigError(f"a method is named twice: {' '.join(methods)}")
    unknown = [m for m in methods if m not in known_methods()]
    if unknown:
        valid = ", ".join(known_methods())
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; valid methods: {valid}")
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"--seeds needs distinct seeds >= 0, e.g. --seeds 0,1,2 (got {list(seeds)})")
    defaults = {f.name: f.default for f in fields(TrialConfig)}
    return StudySpec(
        name=name or study_name(methods),
        description=f"{' vs '.join(methods)} on one budget, {len(seeds)} seed(s)",
        path="sslab compare",
        base={key: defaults[key] for key in BUDGET_FIELDS},  # not each method's own default
        axes=(Axis("method", "values", tuple(methods)),),
        seeds=tuple(seeds),
    )


def compare_plan(
    methods: Sequence[str],
    seeds: Sequence[int],
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> StudyPlan:
    """The validated comparison study; `overrides` (`--set`) apply to every method's trials."""
    overrides = dict(overrides or {})
    fixed = [key for key in SET_BY_COMPARE if key in overrides]
    if fixed:
        raise ConfigError(
            f"{', '.join(fixed)} cannot be set: compare varies them (name methods, use --seeds)"
        )
    spec = compare_spec(methods, seeds, name)
    try:
        return make_plan(spec, overrides)
    except ConfigError as exc:  # one line: the comparison has no file to point into
        problems = [line.strip().removeprefix(f"{spec.path}: ") for line in str(exc).splitlines()[1:]]
        raise ConfigError("compare: " + "; ".join(problems)) from None


def compare_configs(
    methods: Sequence[str], seeds: Sequence[int], overrides: Mapping[str, Any] | None = None
) -> dict[tuple[str, int], TrialConfig]:
    """One config per (method, seed) of the comparison."""
    plan = compare_plan(methods, seeds, overrides)
    return {(cell.axes["method"], cell.axes["seed"]): cell.config for cell in plan.cells}
