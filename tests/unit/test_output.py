"""What a person reads while and after training: epoch lines with only the terms a method uses, the progress
bar only on a terminal, the pipeline's closing "next steps" block."""

from __future__ import annotations

import io
import logging
import re

import pytest

from gkd_core.config import validate_params
from gkd_core.data import prepare_dataset
from gkd_core.progress import TrainingProgress, bar_wanted
from gkd_core.runner import distill_student, train_teacher

TERMS = ("train_kd", "train_wasserstein", "train_grad_match")


def _params(method: str):
    train = {"epochs": 1, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0}
    return validate_params({
        "seed": 0,
        "dataset": {"name": "digits", "limit": 200},
        "teacher": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "method": {"name": method},
        "losses": {"grad_match": {"variant": "logit"}, "wasserstein": {"n_projections": 8}},
        "runtime": {"device": "cpu"},
    })


def _epoch_line(caplog: pytest.LogCaptureFixture, desc: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{desc} epoch 1/1 ")]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_epoch_lines_show_only_the_terms_the_method_uses(caplog: pytest.LogCaptureFixture) -> None:
    """The teacher's line has no always-zero KD/W/GM/weight columns, a KD student's no W/GM, Gompertz all of
    them; the history keeps every column (the CSVs and dvc.yaml's plots read them)."""
    caplog.set_level(logging.INFO, logger="gkd_core.engine")
    params = _params("kd")
    data = prepare_dataset(params.dataset, params.seed)
    teacher = train_teacher(params, data)
    line = _epoch_line(caplog, "teacher")
    assert "train_ce=" in line and "val_accuracy=" in line and "lr=" in line
    assert not any(f"{t}=" in line for t in (*TERMS, "weight"))
    assert set(TERMS) | {"weight"} <= set(teacher.history[0])

    caplog.clear()
    kd = distill_student(params, data, teacher.model)
    line = _epoch_line(caplog, "student[kd]")
    assert "train_kd=" in line and "weight=" in line
    assert "train_wasserstein=" not in line and "train_grad_match=" not in line
    assert set(TERMS) <= set(kd.history[0])

    caplog.clear()
    distill_student(_params("gompertz"), data, teacher.model)
    line = _epoch_line(caplog, "student[gompertz]")
    assert all(f"{t}=" in line for t in TERMS)


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_only_on_a_terminal() -> None:
    assert bar_wanted("auto", _Stream(True)) and not bar_wanted("auto", _Stream(False))
    assert bar_wanted(None, _Stream(True)) and not bar_wanted(False, _Stream(True))
    assert bar_wanted(True, _Stream(False))
    off = TrainingProgress("teacher", 2, 3, enabled=False)
    off.update(1)
    off.end_epoch(1, 0.5, 0.9)
    off.close()
    assert not off.active


def test_runtime_progress_bar_accepts_auto() -> None:
    assert _params("kd").runtime.progress_bar == "auto"
    with pytest.raises(Exception, match="progress_bar"):
        validate_params({**_params("kd").model_dump(mode="json"), "runtime": {"progress_bar": "sometimes"}})


def test_auto_reaches_the_engine_as_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner hands ``runtime.progress_bar`` to fit as it is: "auto" decides there, on the real stderr (it
    once became True through ``auto and rank == 0``, drawing the bar into log files)."""
    import gkd_core.runner as runner

    seen = []
    real_fit = runner.fit
    monkeypatch.setattr(runner, "fit", lambda *a, **k: seen.append(a[4].progress_bar) or real_fit(*a, **k))
    params = _params("none")
    train_teacher(params, prepare_dataset(params.dataset, params.seed))
    assert seen == ["auto"]


def test_pipeline_ends_with_next_steps() -> None:
    from flows.pipeline import next_steps

    lines = next_steps({"project_dir": "/p", "tracking_uri": "sqlite:////p/mlflow.db",
                        "registration": {"name": "gkd-student", "alias": "challenger"}})
    text = "\n".join(lines)
    assert lines[0] == "next steps:"
    for expected in ("/p/reports/", "/p/models/student.onnx", "dvc plots show", "python -m flows.promote",
                     "mlflow ui --backend-store-uri sqlite:////p/mlflow.db",
                     "gkd predict --model models:/gkd-student@challenger"):
        assert expected in text, expected
    assert re.search(r"git add dvc\.lock", text)


def test_a_stage_without_a_parent_run_says_it_was_not_logged(tmp_path, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc repro` / `dvc exp run` stages have no parent MLflow run: their last line says so."""
    from tasks import tracking

    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="tasks.tracking")
    with tracking.stage_run("evaluate", tmp_path) as run:
        assert not run.enabled
    assert caplog.records[-1].getMessage().startswith("evaluate: not logged to MLflow (no parent run")
    assert not (tmp_path / "mlflow.db").exists()
