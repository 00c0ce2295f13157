"""docs/results.md's tables are generated from the committed sweep data (tasks/results_doc.py): the repository's
copy agrees with its data, and an edited number or a missing data folder is caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.results_doc import DOC, ROOT, generated
from tasks.sweep import SweepSpec, compare


def test_the_repository_results_doc_matches_its_committed_data() -> None:
    current, wanted, stale = generated(ROOT)
    assert not stale, f"{DOC}: blocks {stale} differ from docs/results/: python -m tasks.results_doc --write"
    assert current == wanted


def _project(tmp_path: Path) -> Path:
    spec = SweepSpec(name="demo", arms=("none", "kd"), seeds=(0, 1), reference="kd", primary=("kd", "none"))
    points = [{"arm": a, "seed": s, "test_accuracy": v, "best_val_test_accuracy": v, "train_seconds": 2.0,
               "device": "cpu", "objective": a} for (a, s), v in
              {("none", 0): 0.81, ("none", 1): 0.82, ("kd", 0): 0.84, ("kd", 1): 0.86}.items()]
    (tmp_path / "docs/results/demo").mkdir(parents=True)
    (tmp_path / "docs/results/demo/comparison.json").write_text(json.dumps(compare(points, spec)))
    (tmp_path / DOC).write_text("# Results\n\nprose\n\n<!-- results: demo -->\nold table\n<!-- /results -->\n\nmore prose\n")
    return tmp_path


def _tool(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.results_doc", "--root", str(root), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # a hang guard, not a speed check


def test_write_fills_the_blocks_and_check_catches_an_edited_number(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert _tool(root, "--check").returncode == 1
    assert _tool(root, "--write").returncode == 0
    text = (root / DOC).read_text()
    assert text.startswith("# Results\n\nprose\n\n<!-- results: demo -->\n") and text.endswith("<!-- /results -->\n\nmore prose\n")
    assert "| `none` | 2 | 0.8150 ± 0.0071 |" in text and "old table" not in text
    assert _tool(root, "--check").returncode == 0
    (root / DOC).write_text(text.replace("0.8150 ± 0.0071", "0.8160 ± 0.0071"))  # a number typed by hand
    proc = _tool(root, "--check")
    assert proc.returncode == 1 and "['demo']" in proc.stderr


def test_a_committed_markdown_file_is_embedded_without_its_heading(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "docs/results/demo/summary.md").write_text("# Tuning demo\n\n| method | best |\n|---|---|\n| `kd` | 0.9 |\n")
    (root / DOC).write_text("<!-- results: demo/summary.md -->\n<!-- /results -->\n")
    assert generated(root)[1] == "<!-- results: demo/summary.md -->\n| method | best |\n|---|---|\n| `kd` | 0.9 |\n<!-- /results -->\n"


def test_a_block_without_its_data_is_named(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / DOC).write_text("<!-- results: gone -->\nx\n<!-- /results -->\n")
    proc = _tool(root, "--check")
    assert proc.returncode == 2 and "docs/results/gone/comparison.json is missing" in proc.stderr
    with pytest.raises(FileNotFoundError, match="'results: gone' has no data"):
        generated(root)
