"""Stage train_teacher: train the teacher with cross-entropy on the prepared data.

    python -m tasks.train_teacher --params params.yaml
    # -> models/teacher.pt, reports/teacher.json (+ reports/info/teacher.json), reports/plots/teacher_history.csv,
    #    teacher_curves.png

An interrupted run resumes from its full-state checkpoint under checkpoints/ (removed on success).
With ``runtime.nproc > 1`` it trains on that many processes (torchrun + DDP, tasks/launch.py); rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from gkd_core import distributed, runner
from gkd_core.cli_support import load_params_checked
from tasks import tracking
from tasks.cli import stage_app
from tasks.handoff import CheckpointMirror
from tasks.inputs import load_prepared_checked
from tasks.paths import PARAMS_FILE, PREPARED, TEACHER, TEACHER_CURVES, TEACHER_HISTORY, TEACHER_REPORT, StagePaths
from tasks.reports import test_metrics, write_report
from tasks.stages import STAGES
from tasks.training import write_trained_model

logger = logging.getLogger(__name__)
STAGE = "train_teacher"


def train_teacher(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Train ``params.teacher``; write the model, its metrics (incl. test accuracy) and learning curves."""
    params = load_params_checked(paths.root / params_path, overrides, check_dataset=False)
    data = load_prepared_checked(paths.input(PREPARED))
    ckpt = paths.checkpoint("teacher", data)
    if not distributed.is_main():  # a torchrun worker of rank > 0: the same training; rank 0 writes and logs
        runner.train_teacher(params, data, checkpoint_path=ckpt)
        return {}
    mirror = CheckpointMirror.from_env(paths.root, f"{ckpt.name}:{params.model_dump_json()}")
    if mirror is not None:
        mirror.fetch(ckpt)
    with tracking.stage_run(STAGE, paths.root, parent_run_id, params=params) as run:
        result = runner.train_teacher(params, data, checkpoint_path=ckpt, callbacks=[run.callback],
                                      on_checkpoint=mirror.push if mirror else None)
        test = runner.evaluate_model(result.model, data, "test", device=params.runtime.device)
        metrics = {**result.summary, "model": params.teacher.model.name, **test_metrics(test)}
        write_trained_model(result, params.teacher.model, data, metrics, paths.output(TEACHER),
                            paths.output(TEACHER_HISTORY), paths.output(TEACHER_CURVES),
                            f"teacher {params.teacher.model.name}")
        write_report(paths.output(TEACHER_REPORT), metrics)
        tracking.log_stage_files(run, STAGES[STAGE], paths)
    ckpt.unlink(missing_ok=True)
    if mirror is not None:
        mirror.remove(ckpt)
    logger.info("teacher %s: val %.4f, test %.4f -> %s", params.teacher.model.name,
                metrics["final_val_accuracy"], metrics["test_accuracy"], paths.output(TEACHER))
    return metrics


app = stage_app(train_teacher, __doc__, distributed=True)

if __name__ == "__main__":
    app()
