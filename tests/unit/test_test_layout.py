"""pytest imports test modules by basename (rootdir mode, no __init__.py): two test files with one name in
tests/unit and tests/integration stop the whole collection ("import file mismatch") when both run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_folders() -> None:
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert not [n for n, c in names.items() if c > 1], "rename one of each pair"
