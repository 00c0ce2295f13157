"""The layers import downwards only: flows/ -> tasks/ -> gkd_core/. gkd_core never imports tasks, flows,
Prefect, MLflow or DVC (it runs on a GPU box with only torch); tasks never imports flows or Prefect (the
flows wrap its plain functions as Prefect tasks). Read from the source with ast, so lazy imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.code_deps import ROOT, imported_modules

FORBIDDEN = {
    "gkd_core": {"tasks", "flows", "prefect", "mlflow", "dvc"},
    "tasks": {"flows", "prefect"},
}


def _modules(package: str) -> list[tuple[str, Path]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_or_forbidden_imports(package: str) -> None:
    offenders = {}
    for module, path in _modules(package):
        tops = {name.split(".")[0] for name in
                imported_modules(ast.parse(path.read_text()), module, is_package=path.name == "__init__.py")}
        if tops & FORBIDDEN[package]:
            offenders[module] = sorted(tops & FORBIDDEN[package])
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    """No module of gkd_core/, tasks/ or flows/ imports itself back through others."""
    graph: dict[str, set[str]] = {}
    for package in ("gkd_core", "tasks", "flows"):
        for module, path in _modules(package):
            names = imported_modules(ast.parse(path.read_text()), module, is_package=path.name == "__init__.py")
            graph[module] = {n for n in names if n != module}
    graph = {module: deps & graph.keys() for module, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError(" -> ".join(path[path.index(module):] + (module,)))
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + (module,))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
