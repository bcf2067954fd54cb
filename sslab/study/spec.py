"""Study files (`studies/*.toml`): finding, parsing and validating them, every problem reported at once.

A study file holds a name and description, a `[base]` trial config (any field of `sslab run`), `[axes]`
(a list of values, a table of labelled values that each set several fields, or an Optuna distribution),
`exclude`d combinations, replicate `seeds`, the `sampler` (grid | tpe | random) with `n_trials` for the
searches, the `metric` and its `direction`, an optional `[pruner]`, and, for augmentation studies, the
`protocol` with the `first`/`second` op axes and an `[ops]` table naming the view spec of each op.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from sslab.config import FIELD_NAMES, RUNTIME_FIELDS, flatten_keys, is_known_key, load_toml
from sslab.errors import ConfigError
from sslab.metrics import (
    BASELINE_PREFIX,
    KNN_VAL_TOP1,
    LINEAR_TOP1,
    LINEAR_VAL_TOP1,
    epoch_metrics,
    lookup,
    objectives,
    validation_twin,
)

SAMPLERS = ("grid", "tpe", "random")
Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[Direction, ...] = ("maximize", "minimize")
PROTOCOLS = ("asymmetric", "symmetric")
OP_AXES = ("first", "second")  # augmentation axes: the studied op(s), in order
DISTRIBUTIONS = ("int", "float", "log", "categorical")
VIEW_FIELDS = ("aug", "aug1", "aug2")  # set by the protocol in augmentation studies
EPOCH_METRICS = epoch_metrics()  # per-epoch metrics a pruner can watch, with their direction
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEYS = (
    "name",
    "description",
    "base",
    "axes",
    "exclude",
    "seeds",
    "sampler",
    "n_trials",
    "metric",
    "direction",
    "protocol",
    "ops",
    "pruner",
)
Scalar = str | int | float | bool

PRESET_DIR = Path(__file__).resolve().parents[2] / "studies"  # the presets shipped with the repository


@dataclass(frozen=True)
class Axis:
    """One study axis: grid values, labelled values (label -> config fields) or an Optuna distribution."""

    name: str
    kind: str  # values | labels | int | float | log | categorical
    values: tuple[Any, ...] = ()  # grid values, categorical choices or labels, in file order
    labels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    step: float | None = None

    @property
    def discrete(self) -> bool:
        return self.kind in ("values", "labels", "categorical")

    def fields(self, value: Any) -> dict[str, Any]:
        """The config fields that this axis sets for `value` (op axes are turned into views elsewhere)."""
        if self.kind == "labels":
            return dict(self.labels[value])
        if self.name in OP_AXES:
            return {}
        return {self.name: value}

    def describe(self) -> Any:
        if self.kind == "labels":
            return {label: dict(fields) for label, fields in self.labels.items()}
        if self.discrete:
            return list(self.values)
        spec: dict[str, Any] = {"type": self.kind, "low": self.low, "high": self.high}
        return spec if self.step is None else {**spec, "step": self.step}


@dataclass(frozen=True)
class Pruner:
    """Median pruning (Optuna's MedianPruner) on a per-epoch metric."""

    metric: str = KNN_VAL_TOP1.name  # on the validation split: pruning is a choice, never made on test data
    startup_trials: int = 5  # trials that finish before any is pruned
    warmup_epochs: int = 1  # epochs of every trial that are never pruned

    @property
    def direction(self) -> str:
        return EPOCH_METRICS[self.metric]


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    path: str
    base: Mapping[str, Any]
    axes: tuple[Axis, ...]
    exclude: tuple[Mapping[str, tuple[Any, ...]], ...] = ()
    seeds: tuple[int, ...] = (0,)
    sampler: str = "grid"
    n_trials: int | None = None
    metric: str = "linear_top1"
    direction: Direction = "maximize"
    protocol: str | None = None
    ops: Mapping[str, str] = field(default_factory=dict)
    pruner: Pruner | None = None

    def axis(self, name: str) -> Axis:
        return next(a for a in self.axes if a.name == name)

    def op_spec(self, op: str) -> str:
        """The view spec of an op named on the first/second axes."""
        return self.ops.get(op, op)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record of the study (stored with its trials)."""
        return {
            "name": self.name,
            "description": self.description,
            "file": self.path,
            "base": dict(self.base),
            "axes": {axis.name: axis.describe() for axis in self.axes},
            "exclude": [{k: list(v) for k, v in entry.items()} for entry in self.exclude],
            "seeds": list(self.seeds),
            "sampler": self.sampler,
            "n_trials": self.n_trials,
            "metric": self.metric,
            "direction": self.direction,
            "protocol": self.protocol,
            "ops": dict(self.ops),
            "pruner": None if self.pruner is None else self.pruner.__dict__,
        }


# --- finding study files -----------------------------------------------------------------------------------


def search_dirs() -> list[Path]:
    """Where study names are looked up: ./studies, then the presets shipped with sslab."""
    dirs = [Path.cwd() / "studies", PRESET_DIR]
    unique: list[Path] = []
    for directory in dirs:
        if directory.resolve() not in [d.resolve() for d in unique]:
            unique.append(directory)
    return unique


def study_files() -> dict[str, Path]:
    """Every study file by name (file stem); ./studies shadows a preset of the same name."""
    found: dict[str, Path] = {}
    for directory in search_dirs():
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def find_study(name: str) -> Path:
    """A study file from a path or a name in ./studies or the presets."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"study file not found: {path}")
        return path
    files = study_files()
    if name not in files:
        known = ", ".join(files) or "none"
        raise ConfigError(f"unknown study '{name}'; known studies: {known} (or give a path to a .toml file)")
    return files[name]


def load_spec(name: str, problems: Problems | None = None) -> StudySpec:
    path = find_study(name)
    if problems is not None:
        problems.path = str(path)
    return parse_spec(load_toml(path), str(path), problems)


# --- parsing -----------------------------------------------------------------------------------------------


class Problems:
    """Collects every problem of a study file, then raises them together."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        line = f"{where}: {message}"
        if line not in self.items:
            self.items.append(line)

    def raise_if_any(self) -> None:
        if self.items:
            count = f"{len(self.items)} problem{'s' if len(self.items) > 1 else ''}"
            lines = "\n".join(f"  {self.path}: {item}" for item in self.items)
            raise ConfigError(f"{self.path}: {count}; nothing was run\n{lines}")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _choice(
    data: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str | None, problems: Problems
) -> str | None:
    value = data.get(key, default)
    if value is not None and value not in choices:
        problems.add(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return default
    return value


def parse_spec(data: Mapping[str, Any], path: str, problems: Problems | None = None) -> StudySpec:
    """Check a study file's structure; raises one ConfigError listing every problem with its field.

    With `problems` given, problems are collected there instead and a best-effort spec is returned, so that
    later checks (the trial configs) can add theirs before everything is reported together.
    """
    collect = problems is not None
    problems = problems if problems is not None else Problems(path)
    for key in data:
        if key not in _KEYS:
            problems.add(key, f"unknown key; valid keys: {', '.join(_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.add("name", "required: letters, digits, '-', '_' or '.' (e.g. name = \"aug-pairs\")")
        name = Path(path).stem
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.add("description", "must be a string")
        description = ""

    sampler = _choice(data, "sampler", SAMPLERS, "grid", problems)
    direction = _choice(data, "direction", DIRECTIONS, "maximize", problems)
    protocol = _choice(data, "protocol", PROTOCOLS, None, problems)
    # A search selects on its metric: by default on the validation split, never on test accuracy.
    metric = data.get("metric", LINEAR_TOP1.name if sampler == "grid" else LINEAR_VAL_TOP1.name)
    known = lookup(metric) if isinstance(metric, str) else None
    if known is None or not known.final or metric.startswith(BASELINE_PREFIX):
        examples = ", ".join(objectives())
        problems.add(
            "metric", f"unknown metric {metric!r}; final metrics: {examples} (and per layer, e.g. _g2)"
        )
        metric = LINEAR_TOP1.name

    base = data.get("base", {})
    if not isinstance(base, dict):
        problems.add("base", "must be a table of trial config fields")
        base = {}
    base = flatten_keys(base)
    for key in base:
        if not is_known_key(key):
            problems.add(f"base.{key}", "unknown config field (see `sslab run --help`, `sslab methods NAME`)")
    if protocol is not None:
        for key in VIEW_FIELDS:
            if key in base:
                problems.add(f"base.{key}", f"is set by protocol {protocol} from the first/second axes")

    ops = _parse_ops(data.get("ops", {}), problems)
    seeds = _parse_seeds(data.get("seeds", [0]), problems)
    axes = _parse_axes(data.get("axes", {}), problems)
    names = [axis.name for axis in axes]
    op_axes = [n for n in names if n in OP_AXES]
    if protocol is not None and not op_axes:
        problems.add("protocol", "needs a 'first' (and optionally 'second') axis of op names")
    if protocol is None and op_axes:
        problems.add(f"axes.{op_axes[0]}", 'op axes need protocol = "asymmetric" or "symmetric"')
    for axis in axes:
        if axis.name in OP_AXES:
            for value in axis.values:
                if not isinstance(value, str):
                    problems.add(f"axes.{axis.name}", f"values are op names (strings), got {value!r}")
    if not axes and len(seeds) < 2:
        problems.add("axes", "a study needs at least one axis (or several seeds)")

    n_trials = data.get("n_trials")
    if sampler == "grid":
        if n_trials is not None:
            problems.add("n_trials", "only for sampler tpe or random; a grid runs every combination")
        for axis in axes:
            if not axis.discrete:
                problems.add(f"axes.{axis.name}", f"a {axis.kind} distribution needs sampler tpe or random")
    else:
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            problems.add("n_trials", f"sampler {sampler} needs n_trials = a positive integer")
            n_trials = None
        _check_one_seed(sampler, seeds, problems, "seeds")
        twin = validation_twin(metric)
        if twin is not None:
            problems.add(
                "metric",
                f"sampler {sampler} selects on its metric, and {metric} is test accuracy: optimise {twin} "
                "(with base.val_fraction, e.g. 0.1) and read the test accuracy of the best trial",
            )

    exclude = _parse_exclude(data.get("exclude", []), {a.name: a for a in axes}, seeds, problems)
    pruner = _parse_pruner(data.get("pruner"), problems)
    if not collect:
        problems.raise_if_any()
    return StudySpec(
        name=name,
        description=description,
        path=path,
        base={k: v for k, v in base.items() if is_known_key(k)},  # unknown ones are reported above
        axes=tuple(axes),
        exclude=tuple(exclude),
        seeds=tuple(seeds),
        sampler=sampler or "grid",
        n_trials=n_trials,
        metric=metric,
        direction=cast(Direction, direction or "maximize"),  # _choice keeps it to DIRECTIONS
        protocol=protocol,
        ops=ops,
        pruner=pruner,
    )


def _parse_ops(raw: Any, problems: Problems) -> dict[str, str]:
    if not isinstance(raw, dict):
        problems.add("ops", 'must be a table: op name = "view spec"')
        return {}
    ops = {}
    for name, spec in raw.items():
        if not isinstance(spec, str):
            problems.add(f"ops.{name}", 'must be a view spec string such as "crop(scale=0.2-1)"')
        else:
            ops[name] = spec
    return ops


def with_seeds(spec: StudySpec, seeds: Sequence[int], problems: Problems) -> StudySpec:
    """The study with other replicate seeds (`--seeds`), checked as the file's `seeds` would be."""
    parsed = _parse_seeds(list(seeds), problems, "--seeds")
    if spec.sampler != "grid":
        _check_one_seed(spec.sampler, parsed, problems, "--seeds")
    return dataclasses.replace(spec, seeds=tuple(parsed))


def _check_one_seed(sampler: str | None, seeds: Sequence[int], problems: Problems, where: str) -> None:
    """Search samplers take one seed: each of their trials is a new point, not a replicate."""
    if len(seeds) != 1:
        problems.add(where, f"sampler {sampler} takes one seed; replicate good configs in a grid study")


def _parse_seeds(raw: Any, problems: Problems, where: str = "seeds") -> list[int]:
    if (
        not isinstance(raw, list)
        or not raw
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw)
    ):
        problems.add(where, "must be a non-empty list of integers >= 0, e.g. seeds = [0, 1, 2]")
        return [0]
    if len(set(raw)) != len(raw):
        problems.add(where, "has repeated seeds")
    return list(dict.fromkeys(raw))


def _parse_axes(raw: Any, problems: Problems) -> list[Axis]:
    if not isinstance(raw, dict):
        problems.add("axes", "must be a table of axis name = values")
        return []
    axes = []
    for name, value in raw.items():
        where = f"axes.{name}"
        if name == "seed":
            problems.add(where, "replicate seeds go in `seeds = [...]`, not an axis")
            continue
        if isinstance(value, list):
            axis = _values_axis(name, value, where, problems)
        elif isinstance(value, dict) and isinstance(value.get("type"), str):
            axis = _distribution_axis(name, value, where, problems)
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            axis = _labelled_axis(name, value, where, problems)
        else:
            problems.add(
                where,
                "must be a list of values, a table of labelled values ([axes.NAME.LABEL] with config "
                "fields), or a distribution table with type = int | float | log | categorical",
            )
            continue
        if axis is not None:
            axes.append(axis)
    return axes


def _check_field_axis(name: str, where: str, problems: Problems) -> bool:
    if name in OP_AXES:
        return True
    if not is_known_key(name):
        problems.add(where, "not a config field; name a field, or use labelled values to set fields")
        return False
    if name in RUNTIME_FIELDS:
        problems.add(where, f"{name} is a runtime setting (it does not change the trial), not an axis")
        return False
    return True


def _values_axis(name: str, values: list[Any], where: str, problems: Problems) -> Axis | None:
    if not _check_field_axis(name, where, problems):
        return None
    if not values or not all(_is_scalar(v) for v in values):
        problems.add(where, "needs a non-empty list of numbers, strings or booleans")
        return None
    if len({repr(v) for v in values}) != len(values):
        problems.add(where, "has repeated values")
    return Axis(name, "values", tuple(dict.fromkeys(values)))


def _labelled_axis(name: str, table: dict[str, Any], where: str, problems: Problems) -> Axis | None:
    if name in FIELD_NAMES and name in RUNTIME_FIELDS:
        problems.add(where, f"{name} is a runtime setting and cannot be an axis")
        return None
    labels: dict[str, dict[str, Any]] = {}
    for label, fields in table.items():
        for key in flatten_keys(fields):
            if not is_known_key(key):
                problems.add(f"{where}.{label}.{key}", "unknown config field")
        labels[label] = flatten_keys(fields)
    return Axis(name, "labels", tuple(labels), labels=labels)


def _distribution_axis(name: str, table: dict[str, Any], where: str, problems: Problems) -> Axis | None:
    if not _check_field_axis(name, where, problems):
        return None
    kind = table["type"]
    if kind not in DISTRIBUTIONS:
        problems.add(f"{where}.type", f"must be one of {', '.join(DISTRIBUTIONS)} (got {kind!r})")
        return None
    if kind == "categorical":
        unknown = set(table) - {"type", "choices"}
        choices = table.get("choices")
        if unknown:
            problems.add(where, f"unknown key(s) {', '.join(sorted(unknown))}; a categorical takes choices")
        if not isinstance(choices, list) or not choices or not all(_is_scalar(c) for c in choices):
            problems.add(f"{where}.choices", "needs a non-empty list of numbers, strings or booleans")
            return None
        return Axis(name, "categorical", tuple(dict.fromkeys(choices)))
    unknown = set(table) - {"type", "low", "high", "step"}
    if unknown:
        problems.add(where, f"unknown key(s) {', '.join(sorted(unknown))}; valid: type, low, high, step")
    low, high, step = table.get("low"), table.get("high"), table.get("step")
    number = int if kind == "int" else (int, float)
    if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool):
        problems.add(where, f"a {kind} distribution needs numeric low and high")
        return None
    if low > high or (kind == "log" and low <= 0):
        problems.add(where, f"needs low <= high{' and low > 0' if kind == 'log' else ''} (got {low}, {high})")
        return None
    if step is not None and (kind == "log" or not isinstance(step, number) or step <= 0):
        problems.add(f"{where}.step", "must be a positive number (and is not allowed with log)")
        step = None
    return Axis(name, kind, (), low=low, high=high, step=step)


def _parse_exclude(
    raw: Any, axes: Mapping[str, Axis], seeds: list[int], problems: Problems
) -> list[dict[str, tuple[Any, ...]]]:
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        problems.add("exclude", 'must be a list of tables, e.g. exclude = [{ head = "none" }]')
        return []
    entries = []
    for index, entry in enumerate(raw):
        where = f"exclude[{index}]"
        parsed: dict[str, tuple[Any, ...]] = {}
        for name, value in entry.items():
            values = tuple(value) if isinstance(value, list) else (value,)
            known = tuple(seeds) if name == "seed" else axes[name].values if name in axes else None
            if known is None or (name in axes and not axes[name].discrete):
                problems.add(f"{where}.{name}", "not a discrete axis of this study")
                continue
            for v in values:
                if v not in known:
                    problems.add(f"{where}.{name}", f"{v!r} is not one of the axis values")
            parsed[name] = values
        if not entry:
            problems.add(where, "is empty")
        entries.append(parsed)
    return entries


def _parse_pruner(raw: Any, problems: Problems) -> Pruner | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.add("pruner", 'must be a table, e.g. [pruner] type = "median"')
        return None
    for key in raw:
        if key not in ("type", "metric", "startup_trials", "warmup_epochs"):
            problems.add(f"pruner.{key}", "unknown key; valid: type, metric, startup_trials, warmup_epochs")
    if raw.get("type", "median") != "median":
        problems.add("pruner.type", f"must be median (got {raw.get('type')!r})")
    metric = raw.get("metric", KNN_VAL_TOP1.name)
    twin = validation_twin(metric) if isinstance(metric, str) else None
    if twin is not None:
        problems.add(
            "pruner.metric",
            f"{metric} is measured on the test set, which no choice may look at; prune on {twin} "
            "(with base.val_fraction, e.g. 0.1)",
        )
        metric = KNN_VAL_TOP1.name
    elif metric not in EPOCH_METRICS:
        valid = ", ".join(m for m in EPOCH_METRICS if validation_twin(m) is None)
        problems.add("pruner.metric", f"must be a per-epoch metric: {valid}; got {metric!r}")
        metric = KNN_VAL_TOP1.name
    counts = {}
    for key, default in (("startup_trials", 5), ("warmup_epochs", 1)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.add(f"pruner.{key}", f"must be an integer >= 0 (got {value!r})")
            value = default
        counts[key] = value
    return Pruner(metric, counts["startup_trials"], counts["warmup_epochs"])
