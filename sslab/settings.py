"""Method settings: the knobs one method owns, declared in its file next to the code that reads them.

A method declares a subclass of `MethodSettings` whose `Setting` attributes give each knob's default, help,
valid range and the paper the default comes from; class attributes name the method, its paper, the shared
trial fields it sets differently (`shared_defaults`) or does not read (`ignores`), and the `version` of its
behaviour. This module imports no torch, so listing and validating settings never loads the training code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sslab.errors import ConfigError

SCALARS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def coerce(kind: type, nullable: bool, name: str, value: Any) -> Any:
    """Convert `value` (possibly a command-line string) to `kind`, or raise a one-line ConfigError."""
    if value is None or (isinstance(value, str) and nullable and value.strip().lower() in ("none", "null")):
        if nullable:
            return None
        raise ConfigError(f"{name} cannot be empty")
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool | int):
                return bool(value)
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number + 0.0  # -0.0 -> 0.0: one spelling per number
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value.strip()
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported type {kind.__name__}")  # pragma: no cover


@dataclass(frozen=True)
class Setting:
    """One knob of a method: its default, what it does, and which values are valid."""

    default: Any
    help: str
    source: str = ""  # where the default comes from (paper, official code, or a measurement here)
    kind: type | None = None  # the value's type; None: the default's type
    minimum: float | None = None  # lowest valid value (inclusive)
    above: float | None = None  # lowest valid value (exclusive)
    maximum: float | None = None  # highest valid value (inclusive)
    choices: tuple[str, ...] = ()
    needs: str | None = None  # a bool setting of the same method: this one is read only when that is true
    # (version, value) pairs: trials of a method version below `version` had `value` as their default, so
    # that a fix that changes a default keeps every older trial's identity
    earlier: tuple[tuple[int, Any], ...] = ()

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def default_at(self, version: int | None) -> Any:
        """The default for trials of this method version (None: the current one)."""
        return _value_at(self.default, self.earlier, version)

    def coerce(self, name: str, value: Any) -> Any:
        return coerce(self.type, self.default is None, name, value)

    def problems(self, name: str, value: Any) -> Iterator[str]:
        if value is None:
            return
        if self.choices and value not in self.choices:
            yield f"{name} must be one of {', '.join(self.choices)} (got {value!r})"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if self.minimum is not None and value < self.minimum:
            yield f"{name} must be >= {self.minimum:g} (got {value:g})"
        if self.above is not None and value <= self.above:
            yield f"{name} must be > {self.above:g} (got {value:g})"
        if self.maximum is not None and value > self.maximum:
            yield f"{name} must be <= {self.maximum:g} (got {value:g})"

    def describe_range(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        if self.type is bool:
            return "true | false"
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return ", ".join(parts) or "any"


@dataclass(frozen=True)
class MethodInfo:
    """Everything known about a method without importing its training code."""

    name: str
    paper: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    multicrop: bool = False  # whether it trains on local crops beyond the two global views
    # Shown (by a gloo test against one process on the global batch) to compute the same in several processes;
    # a method without it refuses to run under torchrun.
    multiprocess: bool = False
    own_backbone: bool = False  # replaces the trial's backbone by encoders of its own (CMC's L and ab)
    uses_labels: bool = False  # trains on the class labels (so not on unlabelled images)
    version: int = 1  # bumped when a fix changes what the method computes: its old trials stay, marked older
    shared_defaults: Mapping[str, Any] = field(
        default_factory=dict
    )  # shared trial fields it sets differently
    ignores: tuple[str, ...] = ()  # shared trial fields it does not read (left out of its trials' identity)
    module: str | None = None  # where its implementation lives (imported only to train)
    # {version: {field: value}}: the shared defaults that trials of versions below `version` had
    earlier_shared_defaults: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def defaults(self, version: int | None = None) -> dict[str, Any]:
        return {name: setting.default_at(version) for name, setting in self.settings.items()}

    def shared_defaults_at(self, version: int | None = None) -> dict[str, Any]:
        """The shared fields this method sets differently, for trials of this version (None: current)."""
        values = dict(self.shared_defaults)
        if version is not None:
            for below in sorted(self.earlier_shared_defaults, reverse=True):
                if version < below:
                    values.update(self.earlier_shared_defaults[below])
        return values

    def read(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The settings this method reads for these values (those whose `needs` switch is off left out)."""
        return {
            name: values[name]
            for name, setting in self.settings.items()
            if setting.needs is None or values.get(setting.needs)
        }


class MethodSettings:
    """Base of a method's settings declaration; subclasses list `Setting`s as class attributes."""

    name: ClassVar[str]
    paper: ClassVar[str]
    multicrop: ClassVar[bool] = False
    multiprocess: ClassVar[bool] = False
    own_backbone: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = False
    version: ClassVar[int] = 1
    shared_defaults: ClassVar[Mapping[str, Any]] = {}
    earlier_shared_defaults: ClassVar[Mapping[int, Mapping[str, Any]]] = {}
    ignores: ClassVar[tuple[str, ...]] = ()
    info: ClassVar[MethodInfo]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        settings = {k: v for k, v in vars(cls).items() if isinstance(v, Setting)}
        cls.info = make_info(
            {
                "name": cls.name,
                "paper": cls.paper,
                "multicrop": cls.multicrop,
                "multiprocess": cls.multiprocess,
                "own_backbone": cls.own_backbone,
                "uses_labels": cls.uses_labels,
                "version": cls.version,
                "shared_defaults": dict(cls.shared_defaults),
                "earlier_shared_defaults": dict(cls.earlier_shared_defaults),
                "ignores": tuple(cls.ignores),
            },
            settings,
            cls.__module__,
        )


def make_info(
    attributes: Mapping[str, Any], settings: Mapping[str, Setting], module: str | None
) -> MethodInfo:
    """A MethodInfo from a declaration's class attributes and settings, checking that they fit together."""
    name = attributes.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{module}: a method's settings need name = 'identifier' (got {name!r})")
    for key, setting in settings.items():
        if setting.needs is not None and (
            setting.needs not in settings or settings[setting.needs].type is not bool
        ):
            raise ConfigError(f"{name}.{key}: needs={setting.needs!r} must name a bool setting of {name}")
        if setting.default is None and setting.kind is None:
            raise ConfigError(f"{name}.{key}: a setting without a default needs kind=int|float|str")
    return MethodInfo(
        name=name,
        paper=str(attributes.get("paper", "")),
        settings=dict(settings),
        multicrop=bool(attributes.get("multicrop", False)),
        multiprocess=bool(attributes.get("multiprocess", False)),
        own_backbone=bool(attributes.get("own_backbone", False)),
        uses_labels=bool(attributes.get("uses_labels", False)),
        version=int(attributes.get("version", 1)),
        shared_defaults=dict(attributes.get("shared_defaults", {})),
        earlier_shared_defaults={
            int(v): dict(d) for v, d in dict(attributes.get("earlier_shared_defaults", {})).items()
        },
        ignores=tuple(attributes.get("ignores", ())),
        module=module,
    )


def _value_at(current: Any, earlier: tuple[tuple[int, Any], ...], version: int | None) -> Any:
    value = current
    if version is not None:
        for below, old in sorted(earlier, key=lambda pair: pair[0], reverse=True):
            if version < below:
                value = old
    return value


class SettingValues(Mapping[str, Any]):
    """A method's setting values: read-only, hashable, readable as attributes (`settings.temperature`)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", dict(values or {}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are read-only")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._values) == dict(other)

    def __repr__(self) -> str:
        return f"SettingValues({self._values!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for worker processes
        return (SettingValues, (self._values,))
