"""The architecture's layers: no import cycles, report/ reads the store and never trains, and what only
validates or lists needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sslab"
TRAINING = (
    "sslab.train",
    "sslab.runner",
    "sslab.methods.base",
    "sslab.study.worker",
    "sslab.study.scheduler",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """sslab modules that `path` imports (at import time only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                base = base.rstrip(".")
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in `base` itself
                found.add(base)
    return {name for name in found if name in modules}


def test_no_import_cycles_in_sslab() -> None:
    """Not even through imports deferred into functions."""
    graph = {module_name(p): imports(p, top_level_only=False) for p in PACKAGE.rglob("*.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("path", sorted((PACKAGE / "report").glob("*.py")), ids=lambda p: p.name)
def test_report_never_imports_training_code(path: Path) -> None:
    reached = imports(path, top_level_only=False)
    assert not [name for name in reached if name.startswith(TRAINING) and name != "sslab.methods.catalog"]


def test_reports_validation_and_listing_import_without_torch() -> None:
    modules = [
        "sslab.config",
        "sslab.store",
        "sslab.metrics",
        "sslab.study.expand",
        "sslab.study.status",
        "sslab.study.compare",
        "sslab.cli",
        *sorted(f"sslab.report.{p.stem}" for p in (PACKAGE / "report").glob("*.py") if p.stem != "__init__"),
    ]
    code = "import sys; sys.modules['torch'] = None\n" + "\n".join(f"import {m}" for m in modules)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
