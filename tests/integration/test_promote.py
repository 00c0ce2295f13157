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

    facts = {"accuracy": 0.9, "num_classes": 10, "teacher_accuracy": 0.95, "onnx_parity": "passed",
             "data_sha256": "d" * 64, "classes_sha256": "c" * 64}
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


# --- a registry a team shares (issue 23: like data only, errors are not absence, the file loads) -----------


def test_a_challenger_on_other_data_or_classes_is_refused(registry: Path, tmp_path: Path) -> None:
    from tasks import tracking
    from tasks.registry import CLASSES_TAG, DATA_TAG

    root = registry
    client = tracking.get_client(root)
    edit_params(root, {"promote.max_below_teacher": None})
    v1 = _register(root, tmp_path, 0.80)
    assert client.get_model_version(NAME, v1).tags[DATA_TAG]  # written at registration
    assert _promote(root)["decision"] == "promoted"

    v2 = _register(root, tmp_path, 0.97)  # better, but evaluated on another dataset
    client.set_model_version_tag(NAME, v2, DATA_TAG, "f" * 64)
    rec = _promote(root)
    assert rec["decision"] == "refused" and "other prepared data" in rec["reason"], rec["reason"]
    assert _aliases(root)["champion"] == v1
    assert client.get_model_version(NAME, v2).tags["promote.decision"] == "refused"

    v3 = _register(root, tmp_path, 0.98)  # same data, other class order
    client.set_model_version_tag(NAME, v3, CLASSES_TAG, "0" * 64)
    rec = _promote(root)
    assert rec["decision"] == "refused" and "other classes" in rec["reason"], rec["reason"]

    v4 = _register(root, tmp_path, 0.99)  # registered before the tags existed: unknown data
    client.delete_model_version_tag(NAME, v4, DATA_TAG)
    rec = _promote(root)
    assert rec["decision"] == "refused" and f"version {v4} does not record its prepared data" in rec["reason"]
    assert _aliases(root)["champion"] == v1


@pytest.mark.parametrize("failure", ["PERMISSION_DENIED", "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "connection"])
def test_a_registry_error_is_never_read_as_no_champion(registry: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A 403, a 5xx or a dropped connection while reading the champion alias ends the promotion with its cause;
    before, any MlflowException read as 'no champion' and the challenger was promoted uncompared."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.promote import PromotionError

    root = registry
    edit_params(root, {"promote.max_below_teacher": None})
    v1 = _register(root, tmp_path, 0.90)
    assert _promote(root)["decision"] == "promoted"
    v2 = _register(root, tmp_path, 0.50)  # worse: must never become champion
    real = MlflowClient.get_model_version_by_alias

    def flaky(self, name: str, alias: str):
        if alias == "champion":
            if failure == "connection":
                raise ConnectionError("Connection refused")
            raise MlflowException(f"simulated {failure}", error_code=getattr(
                __import__("mlflow.protos.databricks_pb2", fromlist=[failure]), failure))
        return real(self, name, alias)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", flaky)
    with pytest.raises(PromotionError, match="reading alias 'champion' of 'gkd-student' failed") as err:
        _promote(root)
    assert (failure if failure != "connection" else "ConnectionError") in str(err.value)
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", real)
    assert _aliases(root) == {"challenger": v2, "champion": v1}


def test_a_deleted_run_or_an_unloadable_model_file_is_not_promoted(registry: Path, tmp_path: Path) -> None:
    import tempfile

    from tasks import tracking
    from tasks.promote import PromotionError

    root = registry
    client = tracking.get_client(root)
    edit_params(root, {"promote.max_below_teacher": None})
    before = set(Path(tempfile.gettempdir()).glob("gkd-model-*"))
    v1 = _register(root, tmp_path, 0.90)
    client.delete_run(client.get_model_version(NAME, v1).run_id)
    with pytest.raises(PromotionError, match=f"version {v1} was deleted"):
        _promote(root)
    assert _aliases(root)["champion"] is None

    v2 = _register(root, tmp_path, 0.91)
    mv = client.get_model_version(NAME, v2)
    model_id = mv.model_id or mv.source.removeprefix("models:/").split("/")[0]  # MLflow 3: a logged model
    location = client.get_logged_model(model_id).artifact_location
    files = list(Path(location.removeprefix("file://")).rglob("student.pt"))
    assert len(files) == 1, location
    files[0].write_bytes(b"not a model any more")
    rec = _promote(root)
    assert rec["decision"] == "refused" and f"the model file of version {v2} cannot be loaded" in rec["reason"]
    assert _aliases(root)["champion"] is None
    v3 = _register(root, tmp_path, 0.92)
    assert _promote(root)["decision"] == "promoted" and _aliases(root)["champion"] == v3
    # every download was into a temporary folder that is gone again
    assert set(Path(tempfile.gettempdir()).glob("gkd-model-*")) == before


def test_promote_a_named_version_not_the_alias(registry: Path, tmp_path: Path) -> None:
    """The pipeline promotes the version it registered, whatever `challenger` points to by then."""
    from tasks.paths import StagePaths
    from tasks.promote import promote

    root = registry
    edit_params(root, {"promote.max_below_teacher": None})
    mine = _register(root, tmp_path, 0.90)
    theirs = _register(root, tmp_path, 0.60)  # another pipeline registered after mine: challenger moved
    assert _aliases(root)["challenger"] == theirs
    record = promote(StagePaths(root), version=mine)
    assert record["decision"] == "promoted" and record["challenger"]["version"] == mine
    assert _aliases(root)["champion"] == mine


def test_the_chance_floor_cannot_be_skipped() -> None:
    from gkd_core.sections import PromoteConfig
    from tasks.promote import decide

    chall = {"version": "2", "value": 0.11, "accuracy": 0.11, "num_classes": None, "teacher_accuracy": None,
             "onnx_parity": "passed"}
    decision, reason, _ = decide(chall, None, PromoteConfig(metric="test_accuracy", min_accuracy=0.0))
    assert decision == "refused" and "num_classes is missing" in reason


def test_reports_of_other_weights_are_never_registered(registry: Path, tmp_path: Path) -> None:
    """The evaluation and export reports name the SHA-256 of the model they describe: weights swapped in after
    them (a concurrent run, a stale report) are refused before anything is logged."""
    from gkd_core.cli_support import UserError
    from tasks import tracking
    from tasks.paths import EVALUATE_REPORT, EXPORT_REPORT, ONNX, STUDENT, STUDENT_INFO, STUDENT_REPORT, StagePaths
    from tasks.register import register
    from tasks.reports import file_sha256, info_path, read_report

    root = registry
    assert read_report(root / EVALUATE_REPORT)["model_sha256"] == file_sha256(root / STUDENT)
    assert read_report(root / EXPORT_REPORT)["model_sha256"] == file_sha256(root / STUDENT)
    paths = StagePaths(root, tmp_path / "swapped")
    for rel in (ONNX, STUDENT_REPORT, STUDENT_INFO, EVALUATE_REPORT, EXPORT_REPORT):
        paths.output(rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, paths.output(rel))
    for rel in (EVALUATE_REPORT, EXPORT_REPORT):  # their companions too
        shutil.copy2(info_path(root / rel), info_path(paths.output(rel)))
    other = next((root / "reports/baselines").rglob("student.pt"))  # the baseline's weights: same shapes
    shutil.copy2(other, paths.output(STUDENT))
    with pytest.raises(UserError, match=r"reports/evaluate.json describes weights [0-9a-f]{12}, but .* is "
                                        r"[0-9a-f]{12}: the report is not of this model"):
        register(paths)
    assert tracking.get_client(root).search_registered_models() == []
