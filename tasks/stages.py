"""The pipeline's stages and the files each one writes: one table, used by the MLflow logging of a stage
(live or from its cached outputs) and the test that keeps dvc.yaml in step. The paths are the relative
layout of tasks/paths.py; a :class:`tasks.paths.StagePaths` places them."""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.paths import (
    CONFUSION_CSV, CONFUSION_PNG, DATA_REPORT, EVALUATE_INFO, EVALUATE_REPORT, EXPORT_INFO, EXPORT_REPORT, ONNX,
    PREPARED, SCHEDULE_CSV, SCHEDULE_PNG, STUDENT, STUDENT_CURVES, STUDENT_HISTORY, STUDENT_INFO, STUDENT_REPORT,
    TEACHER, TEACHER_CURVES, TEACHER_HISTORY, TEACHER_INFO, TEACHER_REPORT,
)

# Order matters: it is the dependency order of dvc.yaml.
STAGE_NAMES = ("prepare_data", "train_teacher", "distill_student", "evaluate", "export_onnx")


@dataclass(frozen=True)
class StageSpec:
    """What one stage writes (all DVC-cached outputs).

    ``metrics`` are JSON reports (logged to MLflow as metrics and artifacts: the DVC metrics file and its
    companion, tasks.reports.write_report; dvc.yaml lists only the first under ``metrics``), ``history`` per-epoch CSVs
    (logged as stepped metrics when a cached stage is replayed), ``artifacts`` further files to log.
    """

    name: str
    models: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    history: tuple[str, ...] = ()
    artifacts: tuple[str, ...] = ()
    log_models: tuple[str, ...] = field(default=())  # model files also logged as MLflow artifacts

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.models + self.metrics + self.history + self.artifacts


STAGES: dict[str, StageSpec] = {
    "prepare_data": StageSpec("prepare_data", models=(PREPARED,), metrics=(DATA_REPORT,)),
    "train_teacher": StageSpec(
        "train_teacher", models=(TEACHER,), metrics=(TEACHER_REPORT, TEACHER_INFO), history=(TEACHER_HISTORY,),
        artifacts=(TEACHER_CURVES,),
    ),
    "distill_student": StageSpec(
        "distill_student", models=(STUDENT,), metrics=(STUDENT_REPORT, STUDENT_INFO), history=(STUDENT_HISTORY,),
        artifacts=(STUDENT_CURVES, SCHEDULE_CSV, SCHEDULE_PNG),
    ),
    "evaluate": StageSpec("evaluate", metrics=(EVALUATE_REPORT, EVALUATE_INFO), artifacts=(CONFUSION_CSV, CONFUSION_PNG)),
    "export_onnx": StageSpec("export_onnx", models=(ONNX,), metrics=(EXPORT_REPORT, EXPORT_INFO), log_models=(ONNX,)),
}
