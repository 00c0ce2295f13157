"""Stage distill_student: train the student under the configured method with the frozen teacher.

    python -m tasks.distill_student --params params.yaml
    # -> models/student.pt, reports/student.json (+ reports/info/student.json),
    #    reports/plots/student_history.csv, student_curves.png,
    #    reports/plots/schedule.csv, schedule.png (the distillation weight w(p) the student trained under)

The per-epoch history includes the distillation weight (column ``weight``), so `dvc plots` and MLflow show
the schedule over training. An interrupted run resumes from its checkpoint under checkpoints/. With
``runtime.nproc > 1`` it trains on that many processes (torchrun + DDP, tasks/launch.py); rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from gkd_core import distributed, runner
from gkd_core.cli_support import load_params_checked
from gkd_core.plots import plot_schedules
from gkd_core.methods import method_spec
from gkd_core.schedules import schedule_curve
from tasks import tracking
from tasks.cli import stage_app
from tasks.handoff import CheckpointMirror
from tasks.inputs import load_model_checked, load_prepared_checked
from tasks.paths import (
    PARAMS_FILE, PREPARED, SCHEDULE_CSV, SCHEDULE_PNG, STUDENT, STUDENT_CURVES, STUDENT_HISTORY, STUDENT_REPORT,
    TEACHER, StagePaths,
)
from tasks.reports import file_sha256, test_metrics, write_report, write_schedule_csv
from tasks.stages import STAGES
from tasks.training import write_trained_model

logger = logging.getLogger(__name__)
STAGE = "distill_student"
SCHEDULE_POINTS = 101  # rows of reports/plots/schedule.csv


def distill_student(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    run_name: Optional[str] = None,
    teacher_cache: Optional[Path] = None,
) -> dict[str, Any]:
    """Distil ``params.student`` from the teacher under ``params.method``; write model, metrics, curves.
    ``teacher_cache``: a file of the teacher's outputs a sweep computed once (used when ``runtime.cache_teacher``
    is on and it was computed from this teacher file and this data, else the run computes its own)."""
    params = load_params_checked(paths.root / params_path, overrides, check_dataset=False)
    data = load_prepared_checked(paths.input(PREPARED))
    teacher = None
    if method_spec(params.method.name).needs_teacher:
        teacher, _ = load_model_checked(paths.input(TEACHER), "teacher", "train_teacher", data, params.teacher.model,
                                        "teacher.model")
    ckpt = paths.checkpoint(f"student-{params.method.name}-seed{params.seed}", data)
    if not distributed.is_main():  # a torchrun worker of rank > 0: the same training; rank 0 writes and logs
        runner.distill_student(params, data, teacher, checkpoint_path=ckpt)
        return {}
    mirror = CheckpointMirror.from_env(paths.root, f"{ckpt.name}:{params.model_dump_json()}")
    if mirror is not None:
        mirror.fetch(ckpt)
    with tracking.stage_run(STAGE, paths.root, parent_run_id, params=params, run_name=run_name,
                            tags={"method": params.method.name, "seed": str(params.seed)}) as run:
        shared = None
        if teacher_cache is not None and teacher is not None and Path(teacher_cache).is_file():
            shared = (Path(teacher_cache), teacher_cache_meta(paths.input(TEACHER), data))
        result = runner.distill_student(params, data, teacher, checkpoint_path=ckpt, callbacks=[run.callback],
                                        on_checkpoint=mirror.push if mirror else None, teacher_cache=shared)
        test = runner.evaluate_model(result.model, data, "test", teacher=teacher, device=params.runtime.device)
        schedule = result.schedule  # as trained (an adaptive schedule's final timing)
        metrics = {
            **result.summary,
            "model": params.student.model.name,
            **test_metrics(test),
            "final_weight": result.history[-1].get("weight") if result.history else None,
            "schedule": {k: v for k, v in schedule.state_dict().items() if k != "observations"},
        }
        if result.best_model is not None:  # the protocol of the KD literature: test top-1 at the best val epoch
            metrics["best_val_test_accuracy"] = runner.evaluate_model(result.best_model, data, "test",
                                                                      device=params.runtime.device)["accuracy"]
        if "agreement" in test:
            metrics["agreement"] = test["agreement"]
        write_trained_model(result, params.student.model, data, metrics, paths.output(STUDENT),
                            paths.output(STUDENT_HISTORY), paths.output(STUDENT_CURVES),
                            f"student {params.student.model.name} [{params.method.name}]")
        write_schedule_csv(schedule_curve(schedule, SCHEDULE_POINTS), paths.output(SCHEDULE_CSV))
        plot_schedules([schedule], paths.output(SCHEDULE_PNG), title=f"distillation weight: {params.method.name}")
        write_report(paths.output(STUDENT_REPORT), metrics)
        tracking.log_stage_files(run, STAGES[STAGE], paths)
    ckpt.unlink(missing_ok=True)
    if mirror is not None:
        mirror.remove(ckpt)
    logger.info("student %s [%s]: val %.4f, test %.4f -> %s", params.student.model.name, params.method.name,
                metrics["final_val_accuracy"], metrics["test_accuracy"], paths.output(STUDENT))
    return metrics


def teacher_cache_meta(teacher_file: Path, data: Any) -> dict[str, Any]:
    """What a saved teacher cache must have been computed from: this teacher file and this data."""
    return {"teacher_sha256": file_sha256(teacher_file), "data_sha256": data.meta.get("sha256")}


app = stage_app(distill_student, __doc__, distributed=True)

if __name__ == "__main__":
    app()
