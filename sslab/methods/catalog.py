"""Which methods exist and what they declare, without importing torch.

The settings of the built-in methods are read from their files (the `MethodSettings` subclass at the top of
each) without running them, so that `sslab methods`, `sslab study show` and config validation start fast;
`tests/test_method_settings.py` checks that what is read equals what the imported file declares. A method
defined elsewhere joins the catalog when its file registers it (`sslab.methods.base.register`).
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path
from typing import Any

from sslab.errors import ConfigError
from sslab.settings import SCALARS, MethodInfo, Setting, make_info

# Built-in methods, one file each under sslab/methods/, in the order `sslab methods` lists them.
BUILTIN = (
    # contrastive and non-contrastive
    "simclr",
    "moco",
    "mocov3",
    "byol",
    "simsiam",
    "swav",
    "dino",
    "barlow",
    "vicreg",
    "nnclr",
    "invaspread",
    "cmc",
    # instance discrimination with a memory bank, and the supervised baseline
    "instdisc",
    "supervised",
    # context-based pretext tasks
    "rotation",
    "relpos",
    "jigsaw",
    "colorize",
    "inpaint",
    "exemplar",
    # self-supervised distillation
    "seed",
    "distill",
)

_HERE = Path(__file__).resolve().parent
_catalog: dict[str, MethodInfo] = {}
_builtins_read = False


def _read_builtins() -> None:
    global _builtins_read
    if _builtins_read:
        return
    for name in BUILTIN:
        info = read_declaration(_HERE / f"{name}.py", f"sslab.methods.{name}")
        _catalog.setdefault(info.name, info)
    _builtins_read = True


def methods() -> dict[str, MethodInfo]:
    """Every known method by name: the built-ins, then the ones registered at run time."""
    _read_builtins()
    return dict(_catalog)


def method_info(name: str) -> MethodInfo:
    """The method called `name`, or a one-line ConfigError naming the valid ones."""
    known = methods()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint}; valid methods: {', '.join(known)}")
    return known[name]


def add(info: MethodInfo) -> None:
    """Make a method known (called when its file registers it); a re-registration replaces the entry."""
    _read_builtins()
    _catalog[info.name] = info


def read_declaration(path: Path, module: str) -> MethodInfo:
    """The method declared by the `MethodSettings` subclass in the file at `path`, read without running it.

    Class attributes and `Setting(...)` arguments must be literals (numbers, strings, tuples, dicts) or one of
    the type names int, float, bool, str.
    """
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(_name(base) == "MethodSettings" for base in node.bases):
            attributes: dict[str, Any] = {}
            settings: dict[str, Setting] = {}
            for statement in node.body:
                target, value = _assignment(statement)
                if target is None or value is None:
                    continue
                if isinstance(value, ast.Call) and _name(value.func) == "Setting":
                    args = [_literal(arg, path) for arg in value.args]
                    kwargs = {kw.arg: _literal(kw.value, path) for kw in value.keywords if kw.arg}
                    settings[target] = Setting(*args, **kwargs)
                else:
                    attributes[target] = _literal(value, path)
            return make_info(attributes, settings, module)
    raise ConfigError(f"{path}: no MethodSettings subclass found")


def _assignment(statement: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target = statement.targets[0]
        return (target.id if isinstance(target, ast.Name) else None), statement.value
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return statement.target.id, statement.value
    return None, None


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _literal(node: ast.expr, path: Path) -> Any:
    if isinstance(node, ast.Name) and node.id in SCALARS:
        return SCALARS[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ConfigError(f"{path}:{node.lineno}: method settings must be literals") from None
