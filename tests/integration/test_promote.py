"""Promotion against a real MLflow registry: first champion, better / worse / failed-parity / metric-less
challengers. Versions are registered by tasks.register from the pipeline's real outputs; only the report
files they read are varied (accuracy, parity, a missing metric)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest

from _project import edit_params

pytestmark = pytest.mark.integration
NAME = "gkd-student"


@pytest.fixture
def registry(clone_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None):
    """A clone of the pipeline project with an empty registry of its own."""
    root = clone_project()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    return root


def _register(root: Path, tmp: Path, accuracy: Optional[float], parity: bool = True) -> str:
    """Register the pipeline's student with report files of its own (under ``tmp``, with copies of the rest).
    A report is its metrics file and its companion (tasks.reports.write_report / read_report)."""
    from tasks.paths import EVALUATE_REPORT, EXPORT_REPORT, ONNX, STUDENT, STUDENT_INFO, STUDENT_REPORT, StagePaths
    from tasks.register import register
    from tasks.reports import read_report, write_report

    evaluation = read_report(root / "reports/evaluate.json")
    if accuracy is None:
        evaluation.pop("test_accuracy")
    else:
        evaluation["test_accuracy"] = accuracy
    export = read_report(root / "reports/export.json")
    export["passed"] = parity
    paths = StagePaths(root, tmp / f"{accuracy}-{parity}-{len(list(tmp.iterdir()))}")
    for rel in (STUDENT, ONNX, STUDENT_REPORT, STUDENT_INFO):  # copies: MLflow refuses to log a symlink's target
        paths.output(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, paths.output(rel))
    write_report(paths.output(EVALUATE_REPORT), evaluation)
    write_report(paths.output(EXPORT_REPORT), export)
    return register(paths)["version"]


def _aliases(root: Path) -> dict[str, Optional[str]]:
    from tasks import tracking
    from tasks.promote import _version_by_alias

    client = tracking.get_client(root)
    out = {}
    for alias in ("challenger", "champion"):
        mv = _version_by_alias(client, NAME, alias)
        out[alias] = str(mv.version) if mv else None
    return out


def _promote(root: Path) -> dict[str, Any]:
    from flows.promote import promote

    record = promote(str(root))
    on_disk = json.loads((root / "reports/promote.json").read_text())
    assert on_disk["decision"] == record["decision"] and (root / "reports/promote.md").is_file()
    return record


def test_promotion_rules(registry: Path, tmp_path: Path) -> None:
    from tasks import tracking

    root = registry
    client = tracking.get_client(root)
    edit_params(root, {"promote.max_below_teacher": None})  # the comparisons below, not the teacher floor

    v_bad_parity = _register(root, tmp_path, 0.90, parity=False)
    rec = _promote(root)
    assert rec["decision"] == "refused" and "parity" in rec["reason"]
    assert _aliases(root) == {"challenger": v_bad_parity, "champion": None}

    v1 = _register(root, tmp_path, 0.80)
    rec = _promote(root)
    assert rec["decision"] == "promoted" and "no champion" in rec["reason"]
    assert _aliases(root) == {"challenger": v1, "champion": v1}
    assert client.get_model_version(NAME, v1).tags["promote.decision"] == "promoted"
    assert _promote(root)["decision"] == "unchanged"

    v_worse = _register(root, tmp_path, 0.70)
    rec = _promote(root)
    assert rec["decision"] == "refused" and rec["improvement"] == pytest.approx(-0.10)
    assert _aliases(root)["champion"] == v1
    assert client.get_model_version(NAME, v_worse).tags["promote.decision"] == "refused"

    v_parity_fail = _register(root, tmp_path, 0.95, parity=False)
    rec = _promote(root)
    assert rec["decision"] == "refused" and "parity" in rec["reason"]
    assert _aliases(root) == {"challenger": v_parity_fail, "champion": v1}

    v_better = _register(root, tmp_path, 0.95)
    edit_params(root, {"promote.min_improvement": 0.2})
    rec = _promote(root)
    assert rec["decision"] == "refused" and rec["improvement"] == pytest.approx(0.15)
    edit_params(root, {"promote.min_improvement": 0.05})
    rec = _promote(root)
    assert rec["decision"] == "promoted"
    assert _aliases(root) == {"challenger": v_better, "champion": v_better}
    assert client.get_model_version(NAME, v1).tags["replaced_by"] == v_better

    v_no_metric = _register(root, tmp_path, None)
    rec = _promote(root)
    assert rec["decision"] == "refused" and "missing" in rec["reason"]
    assert _aliases(root) == {"challenger": v_no_metric, "champion": v_better}

    # every decision is also an MLflow run with the report attached
    exp = client.get_experiment_by_name("gkd-pipeline")
    decisions = client.search_runs([exp.experiment_id], filter_string="tags.`gkd.stage` = 'promote'")
    assert len(decisions) == 8
    assert {a.path for a in client.list_artifacts(decisions[0].info.run_id, "reports")} == {
        "reports/promote.json", "reports/promote.md"}


def test_decide_is_pure_and_direction_aware() -> None:
    from gkd_core.sections import PromoteConfig
    from tasks.promote import decide

    def rule(metric: str = "m", higher: bool = True) -> PromoteConfig:
        return PromoteConfig(metric=metric, higher_is_better=higher)

    facts = {"accuracy": 0.9, "num_classes": 10, "teacher_accuracy": 0.95, "onnx_parity": "passed"}
    champ = {"version": "1", "value": 0.30, **facts}
    chall = {"version": "2", "value": 0.25, **facts}
    assert decide(chall, champ, rule("test_ece", higher=False))[0] == "promoted"
    assert decide(chall, champ, rule("test_accuracy"))[0] == "refused"
    assert decide({**chall, "value": 0.30}, champ, rule())[0] == "refused"  # a tie keeps the champion
    assert decide(None, champ, rule())[0] == "refused"
    assert decide(chall, {**champ, "value": None}, rule())[0] == "promoted"


@pytest.mark.parametrize(("facts", "rule", "why"), [
    ({"accuracy": 0.10, "num_classes": 10}, {}, "not clearly above chance"),
    ({"accuracy": 0.19, "num_classes": 10}, {}, "not clearly above chance"),
    ({"accuracy": 0.60, "num_classes": 10, "teacher_accuracy": 0.98}, {}, "trails its teacher"),
    ({"accuracy": 0.60, "num_classes": 10}, {"min_accuracy": 0.7}, "below promote.min_accuracy"),
    ({"num_classes": 10}, {}, "test_accuracy is missing"),
])
def test_floors_refuse_even_the_first_champion(facts: dict, rule: dict, why: str) -> None:
    """A chance-level student (lr 10 ends at 10% on 10 classes) must never become champion, not even the first."""
    from gkd_core.sections import PromoteConfig
    from tasks.promote import decide

    candidate = {"version": "1", "value": facts.get("accuracy", 0.5), "onnx_parity": "passed", **facts}
    decision, reason, _ = decide(candidate, None, PromoteConfig(**rule))
    assert decision == "refused" and why in reason
    fine = {**candidate, "accuracy": 0.9, "value": 0.9, "teacher_accuracy": 0.95}
    assert decide(fine, None, PromoteConfig(**rule))[0] == "promoted"
