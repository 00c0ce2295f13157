"""Stage distill_student: train the student under the configured method with the frozen teacher.

    python -m tasks.distill_student --params params.yaml
    # -> models/student.pt, reports/student.json, reports/plots/student_history.csv, student_curves.png,
    #    reports/plots/schedule.csv, schedule.png (the distillation weight w(p) the student trained under)

The per-epoch history includes the distillation weight (column ``weight``), so `dvc plots` and MLflow show
the schedule over training. An interrupted run resumes from its checkpoint under checkpoints/.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import task

from gkd_core.io import write_json
from tasks import common, plots, tracking
from tasks.stages import (
    PREPARED, SCHEDULE_CSV, SCHEDULE_PNG, STAGES, STUDENT, STUDENT_CURVES, STUDENT_HISTORY, STUDENT_REPORT, TEACHER,
)

logger = logging.getLogger(__name__)
STAGE = "distill_student"


def distill_student(
    params_path: str | Path = "params.yaml",
    data_path: str | Path = PREPARED,
    teacher_path: str | Path = TEACHER,
    out: str | Path = STUDENT,
    report: str | Path = STUDENT_REPORT,
    history_csv: str | Path = STUDENT_HISTORY,
    curves_png: str | Path = STUDENT_CURVES,
    schedule_csv: str | Path = SCHEDULE_CSV,
    schedule_png: str | Path = SCHEDULE_PNG,
    overrides: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    root: str | Path = ".",
    run_name: Optional[str] = None,
    threads: Optional[int] = None,
) -> dict[str, Any]:
    """Distil ``params.student`` from the teacher under ``params.method``; write model, metrics, curves."""
    from gkd_core.runner import distill_student as run_distill
    from gkd_core.runner import evaluate_model
    from gkd_core.plots import plot_schedules
    from gkd_core.schedules import build_schedule

    root = Path(root)
    params = common.load_checked_params(root / params_path, overrides, check_dataset=False)
    common.set_torch_threads(threads)
    data = common.load_prepared_checked(root / data_path)
    teacher = None
    if params.method.name != "none":
        teacher, _ = common.load_model_checked(root / teacher_path, "teacher model", "train_teacher")
    schedule_name, schedule_kwargs = params.method.schedule_params()
    schedule = build_schedule(schedule_name, **schedule_kwargs)
    ckpt = common.checkpoint_path(root, f"student-{params.method.name}-seed{params.seed}", data)
    with tracking.stage_run(STAGE, root, parent_run_id, params=params, run_name=run_name,
                            tags={"method": params.method.name, "seed": str(params.seed)}) as run:
        result = run_distill(params, data, teacher, checkpoint_path=ckpt, callbacks=[run.callback])
        test = evaluate_model(result.model, data, "test", teacher=teacher, device=params.runtime.device)
        metrics = {
            **result.summary,
            "model": params.student.model.name,
            **common.test_metrics(test),
            "final_weight": result.history[-1].get("weight") if result.history else None,
            "schedule": schedule.state_dict(),
        }
        if "agreement" in test:
            metrics["agreement"] = test["agreement"]
        common.write_trained_model(root, result, params.student.model, data, metrics, out, history_csv, curves_png,
                                   f"student {params.student.model.name} [{params.method.name}]")
        plots.write_schedule_csv(schedule, root / schedule_csv)
        plot_schedules([schedule], str(root / schedule_png), title=f"distillation weight: {params.method.name}")
        write_json(root / report, metrics)
        tracking.log_stage_files(run, STAGES[STAGE], paths={
            STUDENT_REPORT: str(report), STUDENT_HISTORY: str(history_csv), STUDENT_CURVES: str(curves_png),
            SCHEDULE_CSV: str(schedule_csv), SCHEDULE_PNG: str(schedule_png)})
    ckpt.unlink(missing_ok=True)
    logger.info("student %s [%s]: val %.4f, test %.4f -> %s", params.student.model.name, params.method.name,
                metrics["final_val_accuracy"], metrics["test_accuracy"], out)
    return metrics


distill_student_task = task(distill_student, name=STAGE, retries=1, retry_delay_seconds=30, tags=["gpu"])

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", "-p", help=common.PARAMS_HELP),
    data: Path = typer.Option(Path(PREPARED), help="prepared dataset"),
    teacher: Path = typer.Option(Path(TEACHER), help="teacher model file"),
    out: Path = typer.Option(Path(STUDENT), help="student model file"),
    report: Path = typer.Option(Path(STUDENT_REPORT), help="metrics JSON"),
    history: Path = typer.Option(Path(STUDENT_HISTORY), help="per-epoch CSV"),
    curves: Path = typer.Option(Path(STUDENT_CURVES), help="learning-curve PNG"),
    schedule_csv: Path = typer.Option(Path(SCHEDULE_CSV), help="w(p) curve CSV"),
    schedule_png: Path = typer.Option(Path(SCHEDULE_PNG), help="w(p) curve PNG"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help=common.SET_HELP),
    parent_run_id: Optional[str] = typer.Option(None, envvar=tracking.PARENT_ENV, help=common.PARENT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Distil the student (validated params first; bad input ends with one message, exit code 2)."""
    common.run_cli(lambda: distill_student(params_path, data, teacher, out, report, history, curves, schedule_csv,
                                           schedule_png, common.parse_overrides(overrides), parent_run_id), verbose)


if __name__ == "__main__":
    app()
