"""What DVC shows users, with the real DVC CLI in a copy of the test project: metrics files that hold numbers
only (their facts in reports/info/), `dvc metrics show` readable (max_abs_diff_e6), the plots defined once
(no default plots against the row number) on a page that works offline, `dvc metrics diff` reading HEAD
through the committed dvc.lock."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from _project import REPO, run

pytestmark = pytest.mark.integration
METRICS = ("reports/teacher.json", "reports/student.json", "reports/evaluate.json", "reports/export.json")
PLOT_TITLES = ("Accuracy (teacher and student)", "Student loss terms", "Distillation weight over training",
               "Distillation weight schedule w(p)", "Confusion matrix (student, test split)")


def _dvc(root: Path, *args: str) -> str:
    proc = run([sys.executable, "-m", "dvc", *args], root)
    return proc.stdout + proc.stderr


def _leaves(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _leaves(value)]
    if isinstance(node, list):
        return [leaf for value in node for leaf in _leaves(value)]
    return [node]


def test_metrics_files_are_numbers_and_their_facts_are_companions(pipeline_run: dict[str, Any],
                                                                   pipeline_project: Path) -> None:
    from tasks.reports import info_path, read_report

    stages = yaml.safe_load((pipeline_project / "dvc.yaml").read_text())["stages"]
    declared = [m for st in stages.values() for m in st.get("metrics", [])]
    assert sorted(declared) == sorted(METRICS)
    for rel in METRICS:
        metrics = json.loads((pipeline_project / rel).read_text())
        text = {k: v for k, v in metrics.items() if not isinstance(v, (bool, int, float))}
        assert not text, f"{rel} holds non-numbers: {text}"
        companion = info_path(pipeline_project / rel)
        assert companion.is_file(), companion
        outs = [o for st in stages.values() for o in st.get("outs", [])]
        assert str(companion.relative_to(pipeline_project)) in outs  # a DVC output, not a metric
    merged = {rel: read_report(pipeline_project / rel) for rel in METRICS}
    assert merged["reports/evaluate.json"]["method"] == "gompertz"
    assert set(merged["reports/evaluate.json"]["per_class_accuracy"]) == {str(i) for i in range(10)}
    assert merged["reports/student.json"]["objective"].startswith("CE + gompertz")
    assert merged["reports/student.json"]["schedule"]["name"] == "gompertz"
    assert len(merged["reports/export.json"]["sha256"]) == 64 and merged["reports/export.json"]["exporter"]
    export = merged["reports/export.json"]
    assert export["max_abs_diff_e6"] == pytest.approx(round(export["max_abs_diff"] * 1e6, 3))


def test_dvc_metrics_show_plots_and_diff(clone_project) -> None:
    root = clone_project()
    shown = json.loads(_dvc(root, "metrics", "show", "--json"))
    leaves = _leaves(shown)
    assert leaves and all(v is None or isinstance(v, (bool, int, float)) for v in leaves), \
        [v for v in leaves if isinstance(v, str)]
    table = _dvc(root, "metrics", "show")
    assert "max_abs_diff_e6" in table and "test_accuracy" in table
    for fact in ("sha256", "gompertz", "digits_cnn", "dynamo", "cpu"):
        assert fact not in table, fact
    export = json.loads((root / "reports/export.json").read_text())
    assert f"{export['max_abs_diff_e6']:g}" in table or export["max_abs_diff_e6"] == 0

    # the committed dvc.lock lets DVC read HEAD's metrics from the cache
    diff = _dvc(root, "metrics", "diff", "--all")
    assert "failed to load" not in diff and "test_accuracy" in diff, diff

    # plots: defined once, with explicit axes, on a page with vega inline
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert not [name for name, st in stages.items() if "plots" in st], "stage-level plots draw default plots"
    assert "/dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()
    out = _dvc(root, "plots", "show")
    html = (root / "dvc_plots" / "index.html").read_text()
    assert "dvc_plots" in out
    body = html[html.index("<body>"):]
    divs = re.findall(r'<div id = "([^"]*)"', body) or re.findall(r'<div id="([^"]*)"', body)
    vega = [d for d in divs if not d.endswith("_png")]
    assert len(vega) == len(PLOT_TITLES), divs
    for title in PLOT_TITLES:
        assert title in body, title
    assert '"field": "step"' not in body, "a default plot drawn against the row number"
    assert "cdn.jsdelivr.net" not in html and "<script src=" not in html  # offline: nothing fetched
    for lib in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert lib in html, lib
