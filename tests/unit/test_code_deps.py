"""tasks.code_deps: dvc.yaml's code deps are the import closure of each stage module, and dvc.yaml says so."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.code_deps import (
    ROOT, code_deps, code_hash, generated_dvc_yaml, imported_modules, module_closure, rewrite_dvc_yaml, stage_modules,
)


def test_dvc_yaml_lists_exactly_the_generated_code_deps() -> None:
    current, generated = generated_dvc_yaml(ROOT)
    assert current == generated, "dvc.yaml's code deps are stale: run `python -m tasks.code_deps --write`"
    assert set(stage_modules(ROOT)) == {"prepare_data", "train_teacher", "distill_student", "evaluate", "export_onnx"}


def test_training_stages_depend_on_the_data_code() -> None:
    """The augmentation and loaders (gkd_core.data) and the config are deps of both training stages."""
    for stage in ("train_teacher", "distill_student"):
        deps = code_deps(ROOT, f"tasks.{stage}")
        assert {f"tasks/{stage}.py", "gkd_core/config.py"} <= set(deps), deps
        assert any(d == "gkd_core/data" or d.startswith("gkd_core/data") for d in deps), deps


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return _tree(tmp_path, {
        "gkd_core/__init__.py": "",
        "gkd_core/io.py": "import os\n",
        "gkd_core/unused.py": "",
        "gkd_core/lazy.py": "",
        "gkd_core/engine.py": "from .io import write\n",
        "gkd_core/data/__init__.py": "from .loaders import TorchLoader\nfrom . import augment\n",
        "gkd_core/data/loaders.py": "from ..engine import fit\n",
        "gkd_core/data/augment.py": "import torch\n",
        "gkd_core/methods/__init__.py": "",
        "gkd_core/methods/kd.py": "",
        "gkd_core/methods/akd.py": "",
        "tasks/__init__.py": "",
        "tasks/other.py": "",
        "tasks/unused.py": "",
        "tasks/stage.py": """
            import yaml
            from gkd_core import data
            import gkd_core.methods.kd

            def main():
                from gkd_core import lazy  # inside a function: still a dependency
        """,
    })


def test_closure_follows_every_import_form(project: Path) -> None:
    closure = module_closure(project, "tasks.stage")
    assert set(closure) == {
        "tasks", "tasks.stage", "gkd_core", "gkd_core.data", "gkd_core.data.loaders", "gkd_core.data.augment",
        "gkd_core.engine", "gkd_core.io", "gkd_core.lazy", "gkd_core.methods", "gkd_core.methods.kd",
    }
    assert closure["gkd_core.data"] == project / "gkd_core/data/__init__.py"


def test_rendering_uses_a_folder_only_when_all_of_it_is_needed(project: Path) -> None:
    assert code_deps(project, "tasks.stage") == [
        "gkd_core/__init__.py", "gkd_core/data", "gkd_core/engine.py", "gkd_core/io.py", "gkd_core/lazy.py",
        "gkd_core/methods/__init__.py", "gkd_core/methods/kd.py", "tasks/__init__.py", "tasks/stage.py",
    ]
    (project / "gkd_core/data/__pycache__").mkdir()
    (project / "gkd_core/data/__pycache__/stale.py").write_text("")  # bytecode folders never count
    assert "gkd_core/data" in code_deps(project, "tasks.stage")


def test_relative_imports_resolve_from_the_containing_package() -> None:
    tree = ast.parse("from . import a\nfrom .b import c\nfrom ..d import e\n")
    assert imported_modules(tree, "pkg.sub.mod") == {"pkg.sub", "pkg.sub.a", "pkg.sub.b", "pkg.sub.b.c", "pkg.d",
                                                     "pkg.d.e"}
    assert imported_modules(tree, "pkg.sub", is_package=True) == {
        "pkg.sub", "pkg.sub.a", "pkg.sub.b", "pkg.sub.b.c", "pkg.d", "pkg.d.e"}


DVC_YAML = """\
# a comment that stays
stages:
  train:
    cmd: python -m tasks.stage --params params.yaml
    deps:
      - data/prepared.pt
      # code:
      - tasks/stage.py
      - gkd_core/old.py
      - models/teacher.pt
    params:
      - seed

  other:
    cmd: echo hi
    deps:
      - gkd_core/io.py
"""


def test_rewrite_replaces_only_the_code_entries_of_generated_stages() -> None:
    out = rewrite_dvc_yaml(DVC_YAML, {"train": ["gkd_core/data", "tasks/stage.py"]})
    assert out == DVC_YAML.replace("      - tasks/stage.py\n      - gkd_core/old.py\n",
                                   "      - gkd_core/data\n      - tasks/stage.py\n")
    assert rewrite_dvc_yaml(out, {"train": ["gkd_core/data", "tasks/stage.py"]}) == out


def test_check_fails_and_shows_the_difference_when_an_import_is_added(project: Path) -> None:
    (project / "dvc.yaml").write_text(DVC_YAML)
    cmd = [sys.executable, "-m", "tasks.code_deps", "--root", str(project)]
    assert subprocess.run([*cmd, "--write"], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    assert subprocess.run([*cmd, "--check"], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    with open(project / "tasks/stage.py", "a") as fh:
        fh.write("import tasks.other\n")
    proc = subprocess.run([*cmd, "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "+      - tasks/other.py" in proc.stdout


def test_code_hash_follows_the_import_closure_and_nothing_else(tmp_path: Path) -> None:
    """A sweep point's fingerprint holds this hash: an edit of any module the stage imports changes it, an edit
    of a module it does not import leaves it."""
    root = _tree(tmp_path, {"tasks/__init__.py": "", "tasks/stage.py": "from tasks import helper\n",
                            "tasks/helper.py": "X = 1\n", "tasks/other.py": "Y = 1\n"})
    first = code_hash(("tasks.stage",), root)
    assert len(first) == 16 and code_hash(("tasks.stage",), root) == first
    (root / "tasks/other.py").write_text("Y = 2\n")
    assert code_hash(("tasks.stage",), root) == first
    (root / "tasks/helper.py").write_text("X = 2\n")
    assert code_hash(("tasks.stage",), root) != first
    assert code_hash(("tasks.stage", "tasks.other"), root) != code_hash(("tasks.stage",), root)
