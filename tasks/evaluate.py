"""Stage evaluate: the student (and teacher) on the test split: accuracy, top-5, ECE, NLL, balanced accuracy,
per-class accuracy, teacher agreement, confusion matrix.

    python -m tasks.evaluate --params params.yaml
    # -> reports/evaluate.json, reports/plots/confusion.csv (dvc plots), reports/plots/confusion.png

reports/evaluate.json is flat for ``dvc metrics show``: ``test_accuracy`` etc. are the student's,
``teacher_test_accuracy`` the teacher's; ``promote.metric`` names one of these keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import task

from gkd_core.io import write_json
from tasks import common, plots, tracking
from tasks.stages import CONFUSION_CSV, CONFUSION_PNG, EVALUATE_REPORT, PREPARED, STAGES, STUDENT, TEACHER

logger = logging.getLogger(__name__)
STAGE = "evaluate"


def evaluate(
    params_path: str | Path = "params.yaml",
    data_path: str | Path = PREPARED,
    student_path: str | Path = STUDENT,
    teacher_path: Optional[str | Path] = TEACHER,
    report: str | Path = EVALUATE_REPORT,
    confusion_csv: str | Path = CONFUSION_CSV,
    confusion_png: str | Path = CONFUSION_PNG,
    overrides: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    root: str | Path = ".",
    run_name: Optional[str] = None,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Evaluate the student on the test split (with teacher agreement when a teacher file is given)."""
    from gkd_core.plots import plot_confusion_matrix
    from gkd_core.runner import evaluate_model

    root = Path(root)
    params = common.load_checked_params(root / params_path, overrides, check_dataset=False)
    common.set_torch_threads(threads)
    data = common.load_prepared_checked(root / data_path)
    student, student_meta = common.load_model_checked(root / student_path, "student model", "distill_student")
    teacher = None
    if teacher_path is not None and (root / teacher_path).is_file():
        teacher, _ = common.load_model_checked(root / teacher_path, "teacher model", "train_teacher")
    with tracking.stage_run(STAGE, root, parent_run_id, params=params, run_name=run_name) as run:
        device = params.runtime.device
        ev = evaluate_model(student, data, "test", teacher=teacher, device=device)
        metrics: dict[str, Any] = {
            "split": ev["split"],
            "n": ev["n"],
            "method": student_meta.get("extra", {}).get("method", params.method.name),
            **common.test_metrics(ev),
            "test_balanced_accuracy": ev["balanced_accuracy"],
            "per_class_accuracy": {c: a for c, a in zip(data.classes, ev["per_class"])},
        }
        if teacher is not None:
            tev = evaluate_model(teacher, data, "test", device=device)
            metrics["agreement"] = ev.get("agreement")
            metrics["teacher_test_accuracy"] = tev["accuracy"]
            if ev["accuracy"] is not None and tev["accuracy"] is not None:
                metrics["accuracy_gap"] = tev["accuracy"] - ev["accuracy"]
        plots.write_confusion_csv(ev["confusion_matrix"], data.classes, root / confusion_csv)
        plot_confusion_matrix(ev["confusion_matrix"], data.classes, root / confusion_png,
                              title=f"student [{metrics['method']}], test split")
        write_json(root / report, metrics)
        tracking.log_stage_files(run, STAGES[STAGE], paths={
            EVALUATE_REPORT: str(report), CONFUSION_CSV: str(confusion_csv), CONFUSION_PNG: str(confusion_png)})
    logger.info("student test accuracy %.4f (teacher %s)", metrics["test_accuracy"],
                f"{metrics['teacher_test_accuracy']:.4f}" if "teacher_test_accuracy" in metrics else "n/a")
    return metrics


evaluate_task = task(evaluate, name=STAGE)

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", "-p", help=common.PARAMS_HELP),
    data: Path = typer.Option(Path(PREPARED), help="prepared dataset"),
    student: Path = typer.Option(Path(STUDENT), help="student model file"),
    teacher: Optional[Path] = typer.Option(Path(TEACHER), help="teacher model file (agreement); skipped if absent"),
    report: Path = typer.Option(Path(EVALUATE_REPORT), help="metrics JSON"),
    confusion_csv: Path = typer.Option(Path(CONFUSION_CSV), help="confusion rows for dvc plots"),
    confusion_png: Path = typer.Option(Path(CONFUSION_PNG), help="confusion matrix PNG"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help=common.SET_HELP),
    parent_run_id: Optional[str] = typer.Option(None, envvar=tracking.PARENT_ENV, help=common.PARENT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Evaluate the student on the test split."""
    common.run_cli(lambda: evaluate(params_path, data, student, teacher, report, confusion_csv, confusion_png,
                                    common.parse_overrides(overrides), parent_run_id), verbose)


if __name__ == "__main__":
    app()
