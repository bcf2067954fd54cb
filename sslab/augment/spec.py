"""View specs (torch-free): parsing ``"crop(scale=0.08-1),flip,color(s=0.5)"`` into steps, and back.

Grammar: comma-separated ops, each ``name`` or ``name(key=value, ...)``; a value is a number (``0.5``),
a range ``lo-hi`` (``0.08-1``; a single number means lo = hi) or ``true``/``false``. Whitespace is ignored.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from sslab.errors import AugmentError

from .signatures import SIGNATURES, OpSignature, Param, Value

_NUMBER = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_RANGE_RE = re.compile(rf"({_NUMBER})\s*-\s*({_NUMBER})")
_OP_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?", re.DOTALL)


@dataclass(frozen=True)
class Step:
    """One op of a view with all of its parameters filled in."""

    op: OpSignature
    params: Mapping[str, Value]

    def __str__(self) -> str:
        return format_op(self.op, self.params)


def format_value(value: Value) -> str:
    """Canonical spec text of a parameter value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return f"{format_value(value[0])}-{format_value(value[1])}"
    text = repr(float(value))
    return text.removesuffix(".0")


def format_op(op: OpSignature, params: Mapping[str, Value], sep: str = ",") -> str:
    """``name(key=value,...)`` with the op's parameters in declaration order; bare name without any."""
    if not op.params:
        return op.name
    args = sep.join(f"{key}={format_value(params[key])}" for key in op.params)
    return f"{op.name}({args})"


def describe_ops() -> str:
    """One line per registered op: its signature with defaults and what it does."""
    rows = [(format_op(op, op.defaults(), sep=", "), op.doc) for op in SIGNATURES.values()]
    width = max(len(signature) for signature, _ in rows)
    return "\n".join(f"{signature:<{width}}  {doc}" for signature, doc in rows)


def _allowed(param: Param) -> str:
    """Human-readable description of a parameter's valid values."""
    if isinstance(param.default, bool):
        return "true or false"
    low = "" if param.low is None else f"{'>' if param.open_low else '>='} {format_value(param.low)}"
    high = "" if param.high is None else f"<= {format_value(param.high)}"
    bounds = " and ".join(part for part in (low, high) if part)
    if isinstance(param.default, tuple):
        return "a number or a range lo-hi with lo <= hi" + (f", both {bounds}" if bounds else "")
    return "a number" + (f" {bounds}" if bounds else "")


def _in_bounds(value: float, param: Param) -> bool:
    if not math.isfinite(value):
        return False
    if param.low is not None and (value < param.low or (param.open_low and value == param.low)):
        return False
    return param.high is None or value <= param.high


def _parse_value(op: OpSignature, key: str, text: str) -> Value:
    """Parse and check one parameter value of `op`; raise AugmentError if it is not allowed."""
    param = op.params[key]
    bad = AugmentError(f"{op.name}: {key} must be {_allowed(param)}, got {text!r}")
    lowered = text.lower()
    if isinstance(param.default, bool):
        if lowered not in ("true", "false"):
            raise bad
        return lowered == "true"
    if _NUMBER_RE.fullmatch(text):
        lo = hi = float(text)
    elif isinstance(param.default, tuple) and (match := _RANGE_RE.fullmatch(text)):
        lo, hi = float(match[1]), float(match[2])
    else:
        raise bad
    if lo > hi or not (_in_bounds(lo, param) and _in_bounds(hi, param)):
        raise bad
    return (lo, hi) if isinstance(param.default, tuple) else lo


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if depth < 0 or depth > 1:
            raise AugmentError(f"bad view spec {spec!r}: unbalanced or nested parentheses")
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise AugmentError(f"bad view spec {spec!r}: unbalanced parentheses")
    return [*parts, spec[start:]]


def _parse_op(text: str, spec: str) -> Step:
    match = _OP_RE.fullmatch(text.strip())
    if not match:
        raise AugmentError(
            f"bad view spec {spec!r}: cannot read op {text.strip()!r}; expected name(key=value, ...)"
        )
    name, arg_text = match[1].lower(), match[2]
    op = SIGNATURES.get(name)
    if op is None:
        raise AugmentError(f"unknown augmentation op {name!r}; valid ops: {', '.join(SIGNATURES)}")
    params = op.defaults()
    given: set[str] = set()
    for arg in (arg_text or "").split(","):
        if not arg.strip():
            if arg_text and arg_text.strip():
                raise AugmentError(f"{name}: empty parameter in {text.strip()!r}")
            continue
        key, eq, value = (part.strip() for part in arg.partition("="))
        key = key.lower()
        if key not in op.params:
            valid = f"valid parameters: {', '.join(op.params)}" if op.params else "it takes no parameters"
            raise AugmentError(f"{name}: unknown parameter {key!r}; {valid}")
        if not eq or not value:
            raise AugmentError(f"{name}: parameter {key!r} needs a value ({key}=...)")
        if key in given:
            raise AugmentError(f"{name}: parameter {key!r} given twice")
        given.add(key)
        params[key] = _parse_value(op, key, value)
    return Step(op, MappingProxyType(params))


def parse_steps(spec: str) -> tuple[Step, ...]:
    """Parse a view spec into steps; an empty spec gives no steps. Raises AugmentError."""
    if not spec.strip():
        return ()
    parts = _split_top_level(spec)
    if any(not part.strip() for part in parts):
        raise AugmentError(f"bad view spec {spec!r}: empty op between commas")
    return tuple(_parse_op(part, spec) for part in parts)


def format_steps(steps: tuple[Step, ...]) -> str:
    """Canonical spec of steps, all parameters spelled out; ``identity`` for no steps."""
    return ",".join(str(step) for step in steps) or "identity"


def canonical_view(spec: str) -> str:
    """The one spelling of a view spec that trial identities use: ops in order, each with only the parameters
    that differ from their defaults, sorted by name (``color(s=1)`` -> ``color``; no ops -> ``identity``)."""
    parts = []
    for step in parse_steps(spec):
        if step.op.name == "identity":
            continue
        defaults = step.op.defaults()
        changed = sorted(key for key, value in step.params.items() if value != defaults[key])
        args = ",".join(f"{key}={format_value(step.params[key])}" for key in changed)
        parts.append(f"{step.op.name}({args})" if args else step.op.name)
    return ",".join(parts) or "identity"
