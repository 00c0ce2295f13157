"""pyproject.toml's direct pins and requirements.lock agree: `make setup` installs the lock and then the project
with --no-deps, so a pin that differs from the lock would never be installed (and `make lock` would move it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)")


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def lock_versions(text: str) -> dict[str, str]:
    return {_name(m.group(1)): m.group(2) for line in text.splitlines() if (m := PIN.match(line.strip()))}


def test_every_dependency_is_pinned_at_the_locked_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *sum(project.get("optional-dependencies", {}).values(), [])]
    lock = lock_versions((REPO / "requirements.lock").read_text())
    pins = {d: PIN.match(d) for d in declared}
    unpinned = [d for d, m in pins.items() if not m]
    assert not unpinned, f"pyproject.toml: pin these with == (the lock decides what installs): {unpinned}"
    wrong = {d: lock.get(_name(m.group(1))) for d, m in pins.items() if lock.get(_name(m.group(1))) != m.group(2)}
    assert not wrong, f"pyproject.toml pin -> version in requirements.lock (run `make lock`): {wrong}"


def test_the_pin_reader_reads_extras_and_markers() -> None:
    assert lock_versions("mlflow[extras]==3.1.0 ; python_version >= '3.11'\n    # via x\nPyYAML==6.0.2\n") == {
        "mlflow": "3.1.0", "pyyaml": "6.0.2"}
