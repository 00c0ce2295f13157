"""dvc.yaml's code dependencies, computed from the source so that they cannot go stale.

    python -m tasks.code_deps            # print each stage's code deps
    python -m tasks.code_deps --check    # exit 1 and print the difference when dvc.yaml is out of date
    python -m tasks.code_deps --write    # rewrite the code entries of each stage's deps in dvc.yaml

A stage whose command runs ``python -m <module>`` depends on every project file (packages
:data:`PROJECT_PACKAGES`) that importing ``<module>`` can load: the transitive closure of its imports, read
with ``ast`` (nothing is imported). Imports anywhere in a file count, inside functions too;
``from pkg import name`` counts ``pkg.name`` when that is a module; importing ``a.b.c`` loads
``a/__init__.py`` and ``a/b/__init__.py`` as well. Imports built at run time (``importlib``) are not seen.

The closure is written as dvc.yaml deps: a package folder (``gkd_core/models``) when every .py file under it
is in the closure, else the single files. ``--write`` replaces only those entries of each stage's ``deps:``
(where the first of them stood); data and model deps (``data/prepared.pt``) and comments stay as they are.
.dvcignore keeps ``__pycache__`` out of folder deps.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

import typer
import yaml

PROJECT_PACKAGES = ("gkd_core", "tasks")
ROOT = Path(__file__).resolve().parents[1]
_MODULE_IN_CMD = re.compile(r"\bpython\S*\s+-m\s+([\w.]+)")
_DEP_ITEM = re.compile(r"^(\s*)-\s+(\S+)\s*$")


def module_file(root: Path, module: str) -> Optional[Path]:
    """The file that defines ``module`` under ``root`` (a package's ``__init__.py``), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of everything the import statements in ``tree`` (the source of ``module``) may load:
    each imported module, and ``pkg.name`` for every ``from pkg import name`` (a submodule or not)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that contains ``module``
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_closure(root: Path, module: str) -> dict[str, Path]:
    """``{module name: file}`` of every project module that importing ``module`` can load (itself included)."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            if name in found or name.split(".")[0] not in PROJECT_PACKAGES:
                continue
            path = module_file(root, name)
            if path is None:  # a function or class imported from a module, or not part of the project
                continue
            found[name] = path
            tree = ast.parse(path.read_text(), filename=str(path))
            todo.extend(imported_modules(tree, name, is_package=path.name == "__init__.py"))
    return found


def _py_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def render_deps(root: Path, files: Iterable[Path]) -> list[str]:
    """dvc.yaml dep entries for ``files``: a folder where all of its .py files are among them, else files."""
    files = {Path(f).resolve() for f in files}
    root = root.resolve()
    entries: list[str] = []

    def visit(folder: Path) -> None:
        mine = _py_files(folder)
        if not mine & files:
            return
        if mine <= files:
            entries.append(folder.relative_to(root).as_posix())
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir():
                visit(child)
            elif child in files:
                entries.append(child.relative_to(root).as_posix())

    for package in PROJECT_PACKAGES:
        visit(root / package)
    return entries


def code_deps(root: Path, module: str) -> list[str]:
    """The code deps of a stage that runs ``python -m module``."""
    return render_deps(root, module_closure(root, module).values())


def code_hash(modules: Iterable[str], root: Path = ROOT) -> str:
    """A hash of the source of every project file that running ``python -m <module>`` for each of ``modules``
    can load (the files dvc.yaml lists as those stages' code deps): what an output computed by that code
    depends on besides its params and data. 16 hex digits of sha256 over (relative path, content) pairs."""
    files: dict[str, Path] = {}
    for module in modules:
        files.update({path.resolve().relative_to(root.resolve()).as_posix(): path
                      for path in module_closure(root, module).values()})
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + files[rel].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stage_modules(root: Path) -> dict[str, str]:
    """``{stage: module}`` for every dvc.yaml stage whose command runs a project module."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    out = {}
    for name, stage in stages.items():
        match = _MODULE_IN_CMD.search(str(stage.get("cmd", "")))
        if match and match.group(1).split(".")[0] in PROJECT_PACKAGES:
            out[name] = match.group(1)
    return out


def _is_code_dep(entry: str) -> bool:
    return entry.split("/")[0] in PROJECT_PACKAGES


def rewrite_dvc_yaml(text: str, deps: dict[str, list[str]]) -> str:
    """``text`` (dvc.yaml) with the code entries of each listed stage's ``deps:`` replaced by ``deps[stage]``."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage: Optional[str] = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = re.match(r"^  (\w[\w-]*):\s*$", line)
        if header:
            stage = header.group(1)
        elif re.match(r"^\S", line):
            stage = None
        out.append(line)
        i += 1
        if stage not in deps or not re.match(r"^    deps:\s*$", line):
            continue
        block: list[str] = []
        while i < len(lines) and (lines[i].strip() == "" or lines[i].lstrip().startswith(("-", "#"))) \
                and (lines[i].strip() == "" or len(lines[i]) - len(lines[i].lstrip()) > 4):
            block.append(lines[i])
            i += 1
        while block and block[-1].strip() == "":  # blank lines after the list belong to what follows
            i -= 1
            block.pop()
        indent = next((m.group(1) for m in map(_DEP_ITEM.match, block) if m), "      ")
        generated = [f"{indent}- {entry}\n" for entry in deps[stage]]
        kept: list[str] = []
        for item in block:
            m = _DEP_ITEM.match(item)
            if m and _is_code_dep(m.group(2)):
                kept.extend(generated)
                generated = []
            else:
                kept.append(item)
        out.extend(kept + generated)
    return "".join(out)


def generated_dvc_yaml(root: Path = ROOT) -> tuple[str, str]:
    """(dvc.yaml as it is, dvc.yaml as the source says it should be)."""
    text = (root / "dvc.yaml").read_text()
    deps = {stage: code_deps(root, module) for stage, module in stage_modules(root).items()}
    return text, rewrite_dvc_yaml(text, deps)


def main(check: bool = typer.Option(False, "--check", help="exit 1 and print the difference if dvc.yaml is stale"),
         write: bool = typer.Option(False, "--write", help="rewrite the code deps in dvc.yaml"),
         root: Path = typer.Option(ROOT, help="the project folder")) -> None:
    """Compute each stage's code deps from its module's imports; print, check or write them."""
    current, wanted = generated_dvc_yaml(root)
    if write:
        if wanted != current:
            (root / "dvc.yaml").write_text(wanted)
        typer.echo("dvc.yaml: code deps " + ("rewritten" if wanted != current else "already up to date"))
    elif check:
        if wanted != current:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(keepends=True), wanted.splitlines(keepends=True),
                                                       "dvc.yaml", "dvc.yaml (generated)"))
            typer.echo("dvc.yaml's code deps are out of date: python -m tasks.code_deps --write", err=True)
            raise typer.Exit(1)
        typer.echo("dvc.yaml: code deps up to date")
    else:
        for stage, module in stage_modules(root).items():
            typer.echo(yaml.safe_dump({stage: code_deps(root, module)}, sort_keys=False), nl=False)


if __name__ == "__main__":
    typer.run(main)
