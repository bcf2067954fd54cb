"""From a study spec and command-line overrides to trial configs: one per grid cell, or on demand per search
trial.

A trial's config is `from_mapping({**base, **axis fields, **overrides})`, so the chosen method's defaults fill
every field left unset. Augmentation protocols (SimCLR Fig. 5) turn the `first`/`second` op axes into views:

- `asymmetric`: aug1 = the studied ops (first, then second; a single op when they are equal) and
  aug2 = `identity`. The paper first crops and resizes every image, one box shared by both branches; a
  study sets that with `base_aug` (e.g. `base_aug = "crop"`), which both views start from.
- `symmetric`: both views use the studied ops (aug = first,second).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sslab.config import FIELD_NAMES, VERSION_FIELDS, TrialConfig, from_mapping, setting_owners
from sslab.errors import ConfigError
from sslab.metrics import lookup
from sslab.study.spec import OP_AXES, VIEW_FIELDS, Axis, Problems, StudySpec


@dataclass(frozen=True)
class Cell:
    """One trial of a study: its values on the study's axes (seed included) and its full config."""

    axes: Mapping[str, Any]
    config: TrialConfig

    @property
    def hash(self) -> str:
        return self.config.hash()

    @property
    def label(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.axes.items())


@dataclass(frozen=True)
class StudyPlan:
    """A validated study with its overrides: everything a worker needs to run it."""

    spec: StudySpec
    name: str  # the name the study is recorded under (the spec's name unless --name)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    cells: tuple[Cell, ...] = ()  # grid studies: every cell that is not excluded
    excluded: int = 0
    optuna_name: str | None = None  # the Optuna study behind it; a new one whenever the search space changes

    @property
    def optuna_study(self) -> str:
        return self.optuna_name or self.name

    @property
    def is_grid(self) -> bool:
        return self.spec.sampler == "grid"

    @property
    def total(self) -> int:
        return len(self.cells) if self.is_grid else int(self.spec.n_trials or 0)

    def grid_space(self) -> dict[str, list[Any]]:
        """The Optuna GridSampler search space: every discrete axis and the seeds."""
        space = {axis.name: list(axis.values) for axis in self.spec.axes}
        return {**space, "seed": list(self.spec.seeds)}

    def cell_for(self, axes: Mapping[str, Any]) -> Cell:
        """The cell at these axis values (seed included), its config built and validated."""
        return Cell(dict(axes), build_config(self.spec, axes, self.overrides))

    def excluded_by_file(self, axes: Mapping[str, Any]) -> bool:
        return is_excluded(self.spec, axes)

    def search_space(self) -> dict[str, Any]:
        """What Optuna's distributions are made of (they cannot change within one Optuna study)."""
        return {"axes": {a.name: a.describe() for a in self.spec.axes}, "seeds": list(self.spec.seeds)}

    def record(self) -> dict[str, Any]:
        """The study as stored with its trials: the spec, the overrides and the Optuna study behind it."""
        return {
            "kind": "study",
            **self.spec.to_dict(),
            "name": self.name,
            "set": dict(self.overrides),
            "optuna_study": self.optuna_study,
        }


def trial_fields(spec: StudySpec, axes: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that the axis values set (views from the protocol, seed included)."""
    fields: dict[str, Any] = {}
    for axis in spec.axes:
        fields.update(axis.fields(axes[axis.name]))
    if spec.protocol is not None:
        ops = [axes[name] for name in OP_AXES if name in axes]
        if len(ops) == 2 and ops[0] == ops[1]:
            ops = ops[:1]  # the diagonal: a single transformation
        studied = ",".join(spec.op_spec(op) for op in ops)
        if spec.protocol == "asymmetric":
            fields.update(aug1=studied, aug2="identity")
        else:
            fields.update(aug=studied, aug1=None, aug2=None)
    fields["seed"] = axes["seed"]
    return fields


def build_config(spec: StudySpec, axes: Mapping[str, Any], overrides: Mapping[str, Any]) -> TrialConfig:
    """The cell's config through the one front door; settings of methods other than the cell's are skipped
    (a study whose cells differ in method may set each method's own), `unused_settings` reports the rest."""
    where = ", ".join(f"{k}={v}" for k, v in axes.items())
    values = {**spec.base, **trial_fields(spec, axes), **overrides}
    return from_mapping(values, source=where, other_methods="ignore")


def unused_settings(spec: StudySpec, overrides: Mapping[str, Any], cells: Sequence[Cell]) -> list[str]:
    """Method settings set by the base or --set that no cell's method reads (a typo or a wrong method)."""
    used_methods = {cell.config.method for cell in cells}
    problems = []
    for key in [*spec.base, *overrides]:
        key = key.replace("-", "_")
        if key in FIELD_NAMES or key in VERSION_FIELDS:
            continue
        owner, dot, name = key.partition(".")
        owners = [owner] if dot else setting_owners(key)
        if not used_methods & set(owners):
            problems.append(f"{key} is a setting of {', '.join(owners)}, and no trial of this study uses it")
    return problems


def _check_validation_split(spec: StudySpec, configs: Sequence[TrialConfig], problems: Problems) -> None:
    """A study that selects or prunes on a validation metric needs trials that hold a validation split out."""
    chosen = [spec.metric, *([spec.pruner.metric] if spec.pruner else [])]
    needs = [name for name in chosen if (metric := lookup(name)) is not None and metric.split == "val"]
    if needs and any(config.val_fraction <= 0 for config in configs):
        problems.add("base.val_fraction", f"{needs[0]} needs a validation split: set val_fraction, e.g. 0.1")


def is_excluded(spec: StudySpec, axes: Mapping[str, Any]) -> bool:
    return any(all(axes.get(name) in values for name, values in entry.items()) for entry in spec.exclude)


def _combinations(spec: StudySpec) -> Iterator[dict[str, Any]]:
    names = [axis.name for axis in spec.axes]
    for values in itertools.product(*(axis.values for axis in spec.axes), spec.seeds):
        yield dict(zip([*names, "seed"], values, strict=True))


def _sample_values(axis: Axis) -> tuple[Any, ...]:
    """Values that exercise an axis during validation: every discrete value, or a distribution's bounds."""
    if axis.discrete:
        return axis.values
    low, high = axis.low, axis.high
    return (low, high) if axis.kind != "int" else (int(low or 0), int(high or 0))


def make_plan(
    spec: StudySpec,
    overrides: Mapping[str, Any] | None = None,
    name: str | None = None,
    problems: Problems | None = None,
) -> StudyPlan:
    """Validate the study with the overrides and expand its grid; raises one ConfigError with every problem
    (those already in `problems` included)."""
    overrides = dict(overrides or {})
    problems = problems if problems is not None else Problems(spec.path)
    set_by_axes = {"seed"}
    for axis in spec.axes:
        if axis.kind == "labels":
            set_by_axes |= {key for fields in axis.labels.values() for key in fields}
        elif axis.name not in OP_AXES:
            set_by_axes.add(axis.name)
    if spec.protocol is not None:
        set_by_axes |= set(VIEW_FIELDS)
    for key in overrides:
        if key in set_by_axes:
            problems.add(f"--set {key}", "is set by the study's axes, seeds or protocol")
    base_parts: set[str] = set()
    try:
        from_mapping({**spec.base, **overrides}, source="base", other_methods="ignore")
    except ConfigError as exc:
        problems.add("base", str(exc).removeprefix("base: "))
        base_parts = set(str(exc).removeprefix("base: ").split("; "))

    # Each axis value on its own, the other axes at their first value: errors name the axis and value.
    first = {axis.name: _sample_values(axis)[0] for axis in spec.axes} | {"seed": spec.seeds[0]}
    for axis in spec.axes:
        for value in _sample_values(axis):
            try:
                build_config(spec, {**first, axis.name: value}, overrides)
            except ConfigError as exc:
                parts = [p for p in str(exc).split(": ", 1)[-1].split("; ") if p not in base_parts]
                if parts:  # the base's own problems are reported once, above
                    problems.add(f"axes.{axis.name} = {value!r}", "; ".join(parts))
    problems.raise_if_any()
    if spec.sampler != "grid":
        base = from_mapping({**spec.base, **overrides}, source="base", other_methods="ignore")
        _check_validation_split(spec, [base], problems)
        problems.raise_if_any()
        return StudyPlan(spec, name or spec.name, overrides)

    seen: dict[str, Cell]  # cell hash -> the first cell giving that trial
    cells, excluded, seen = [], 0, {}
    for axes in _combinations(spec):
        if is_excluded(spec, axes):
            excluded += 1
            continue
        try:
            cell = Cell(axes, build_config(spec, axes, overrides))
        except ConfigError as exc:
            problems.add("axes", str(exc))
            continue
        if cell.hash in seen:
            problems.add(
                "axes", f"cells ({seen[cell.hash].label}) and ({cell.label}) give the same trial; exclude one"
            )
            continue
        seen[cell.hash] = cell
        cells.append(cell)
    if not cells and not problems.items:
        problems.add("exclude", "excludes every combination of the axes")
    for problem in unused_settings(spec, overrides, cells):
        problems.add("settings", problem)
    _check_validation_split(spec, [cell.config for cell in cells], problems)
    problems.raise_if_any()
    return StudyPlan(spec, name or spec.name, overrides, tuple(cells), excluded)
