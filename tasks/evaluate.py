"""Stage evaluate: the student (and teacher) on the test split: accuracy, top-5, ECE, NLL, balanced accuracy,
per-class accuracy, teacher agreement, confusion matrix.

    python -m tasks.evaluate --params params.yaml
    # -> reports/evaluate.json, reports/info/evaluate.json, reports/plots/confusion.csv (dvc plots),
    #    reports/plots/confusion.png

reports/evaluate.json is flat and numeric for ``dvc metrics show``: ``test_accuracy`` etc. are the student's,
``teacher_test_accuracy`` the teacher's; ``promote.metric`` names one of these keys. Its companion
reports/info/evaluate.json holds the split, the method, the counts and the per-class accuracy. The teacher is
optional: without its file there is no agreement and no teacher accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from gkd_core.cli_support import load_params_checked
from gkd_core.plots import plot_confusion_matrix
from gkd_core.runner import evaluate_model
from tasks import tracking
from tasks.cli import stage_app
from tasks.inputs import load_model_checked, load_prepared_checked
from tasks.paths import CONFUSION_CSV, CONFUSION_PNG, EVALUATE_REPORT, PARAMS_FILE, PREPARED, STUDENT, TEACHER, StagePaths
from tasks.reports import file_sha256, test_metrics, write_confusion_csv, write_report
from tasks.stages import STAGES

logger = logging.getLogger(__name__)
STAGE = "evaluate"


def evaluate(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    run_name: Optional[str] = None,
) -> dict[str, Any]:
    """Evaluate the student on the test split (with teacher agreement when the teacher file exists)."""
    params = load_params_checked(paths.root / params_path, overrides, check_dataset=False)
    data = load_prepared_checked(paths.input(PREPARED))
    model_sha256 = file_sha256(paths.input(STUDENT))  # what this report describes (register checks it)
    student, student_meta = load_model_checked(paths.input(STUDENT), "student", "distill_student", data,
                                               params.student.model, "student.model")
    teacher = None
    if paths.input(TEACHER).is_file():
        teacher, _ = load_model_checked(paths.input(TEACHER), "teacher", "train_teacher", data,
                                        params.teacher.model, "teacher.model")
    with tracking.stage_run(STAGE, paths.root, parent_run_id, params=params, run_name=run_name) as run:
        device = params.runtime.device
        ev = evaluate_model(student, data, "test", teacher=teacher, device=device)
        metrics: dict[str, Any] = {
            "split": ev["split"],
            "n": ev["n"],
            "num_classes": data.num_classes,
            "method": student_meta.extra.get("method", params.method.name),
            "model_sha256": model_sha256,
            **test_metrics(ev),
            "test_balanced_accuracy": ev["balanced_accuracy"],
            "per_class_accuracy": {c: a for c, a in zip(data.classes, ev["per_class"])},
        }
        if teacher is not None:
            tev = evaluate_model(teacher, data, "test", device=device)
            metrics["agreement"] = ev.get("agreement")
            metrics["teacher_test_accuracy"] = tev["accuracy"]
            if ev["accuracy"] is not None and tev["accuracy"] is not None:
                metrics["accuracy_gap"] = tev["accuracy"] - ev["accuracy"]
        write_confusion_csv(ev["confusion_matrix"], data.classes, paths.output(CONFUSION_CSV))
        plot_confusion_matrix(ev["confusion_matrix"], data.classes, paths.output(CONFUSION_PNG),
                              title=f"student [{metrics['method']}], test split")
        write_report(paths.output(EVALUATE_REPORT), metrics)
        tracking.log_stage_files(run, STAGES[STAGE], paths)
    logger.info("student test accuracy %.4f (teacher %s)", metrics["test_accuracy"],
                f"{metrics['teacher_test_accuracy']:.4f}" if "teacher_test_accuracy" in metrics else "n/a")
    return metrics


app = stage_app(evaluate, __doc__)

if __name__ == "__main__":
    app()
