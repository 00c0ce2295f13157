"""Stage train_teacher: train the teacher with cross-entropy on the prepared data.

    python -m tasks.train_teacher --params params.yaml
    # -> models/teacher.pt, reports/teacher.json, reports/plots/teacher_history.csv, teacher_curves.png

An interrupted run resumes from its full-state checkpoint under checkpoints/ (removed on success).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import task

from gkd_core.io import write_json
from tasks import common, tracking
from tasks.stages import PREPARED, STAGES, TEACHER, TEACHER_CURVES, TEACHER_HISTORY, TEACHER_REPORT

logger = logging.getLogger(__name__)
STAGE = "train_teacher"


def train_teacher(
    params_path: str | Path = "params.yaml",
    data_path: str | Path = PREPARED,
    out: str | Path = TEACHER,
    report: str | Path = TEACHER_REPORT,
    history_csv: str | Path = TEACHER_HISTORY,
    curves_png: str | Path = TEACHER_CURVES,
    overrides: Optional[dict[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """Train ``params.teacher``; write the model, its metrics (incl. test accuracy) and learning curves."""
    from gkd_core.runner import evaluate_model
    from gkd_core.runner import train_teacher as run_train_teacher

    root = Path(root)
    params = common.load_checked_params(root / params_path, overrides, check_dataset=False)
    data = common.load_prepared_checked(root / data_path)
    ckpt = common.checkpoint_path(root, "teacher", data)
    with tracking.stage_run(STAGE, root, parent_run_id, params=params) as run:
        result = run_train_teacher(params, data, checkpoint_path=ckpt, callbacks=[run.callback])
        test = evaluate_model(result.model, data, "test", device=params.runtime.device)
        metrics = {**result.summary, "model": params.teacher.model.name, **common.test_metrics(test)}
        common.write_trained_model(root, result, params.teacher.model, data, metrics, out, history_csv, curves_png,
                                   f"teacher {params.teacher.model.name}")
        write_json(root / report, metrics)
        tracking.log_stage_files(run, STAGES[STAGE], paths={
            TEACHER_REPORT: str(report), TEACHER_HISTORY: str(history_csv), TEACHER_CURVES: str(curves_png)})
    ckpt.unlink(missing_ok=True)
    logger.info("teacher %s: val %.4f, test %.4f -> %s", params.teacher.model.name,
                metrics["final_val_accuracy"], metrics["test_accuracy"], out)
    return metrics


train_teacher_task = task(train_teacher, name=STAGE, retries=1, retry_delay_seconds=30, tags=["gpu"])

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", "-p", help=common.PARAMS_HELP),
    data: Path = typer.Option(Path(PREPARED), help="prepared dataset"),
    out: Path = typer.Option(Path(TEACHER), help="teacher model file"),
    report: Path = typer.Option(Path(TEACHER_REPORT), help="metrics JSON"),
    history: Path = typer.Option(Path(TEACHER_HISTORY), help="per-epoch CSV"),
    curves: Path = typer.Option(Path(TEACHER_CURVES), help="learning-curve PNG"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help=common.SET_HELP),
    parent_run_id: Optional[str] = typer.Option(None, envvar=tracking.PARENT_ENV, help=common.PARENT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train the teacher (validated params first; bad input ends with one message, exit code 2)."""
    common.run_cli(lambda: train_teacher(params_path, data, out, report, history, curves,
                                         common.parse_overrides(overrides), parent_run_id), verbose)


if __name__ == "__main__":
    app()
