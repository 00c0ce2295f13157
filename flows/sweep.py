"""Methods x seeds as parallel Prefect tasks, then a comparison table (markdown + JSON + PNG, mean ± std).

    python -m flows.sweep --methods none,kd,gompertz --seeds 0,1,2 --workers 2

prepare_data and train_teacher run first through DVC (so the sweep shares the pipeline's cached data and
teacher); then every (method, seed) distils and evaluates a student in its own process
(``ProcessPoolTaskRunner``), under one MLflow parent run. Point outputs go to
``reports/sweep/points/<method>-seed<n>/``, the comparison to ``reports/sweep/``.

Why tasks rather than ``dvc exp run``: every point shares one teacher (a DVC experiment per seed would
retrain it, since ``seed`` is a teacher param too), points run in parallel without a git commit per
experiment, and each point is a retryable task in the flow's observability. ``dvc exp run -S`` remains the
tool for single what-if runs of the whole pipeline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import flow, get_run_logger
from prefect.task_runners import ProcessPoolTaskRunner
from rich.console import Console
from rich.markdown import Markdown

from flows.pipeline import validate_inputs
from flows.prefect_tasks import stage_options, stage_task, sweep_point_task
from gkd_core.cli_support import UserError, load_params_checked, run_cli
from tasks import tracking
from tasks.cli import configure_logging
from tasks.paths import PARAMS_FILE
from tasks.sweep import POINTS_DIR, SUMMARY_METRICS, write_comparison

logger = logging.getLogger(__name__)
DEFAULT_METHODS = ["none", "kd", "gompertz"]
DEFAULT_SEEDS = [0, 1, 2]
OUT_DIR = "reports/sweep"


def check_sweep(root: Path, methods: list[str], seeds: list[int], metric: str) -> None:
    """Every (method, seed) must give valid params; the metric must be one the table summarises."""
    if not methods or not seeds:
        raise UserError("a sweep needs at least one method and one seed")
    if metric not in SUMMARY_METRICS:
        raise UserError(f"metric {metric!r} not summarised; choose one of {', '.join(SUMMARY_METRICS)}")
    for method in methods:
        for seed in seeds:
            load_params_checked(root / PARAMS_FILE, {"method.name": method, "seed": seed}, check_dataset=False)


@flow(name="gkd-sweep", task_runner=ProcessPoolTaskRunner(max_workers=2))
def sweep(
    methods: Optional[list[str]] = None,
    seeds: Optional[list[int]] = None,
    project_dir: str = ".",
    metric: str = "test_accuracy",
    threads_per_worker: Optional[int] = None,
) -> dict[str, Any]:
    """Run the sweep; returns ``{"parent_run_id", "points", "files"}``. Use ``sweep.with_options(
    task_runner=ProcessPoolTaskRunner(max_workers=n))`` for another degree of parallelism."""
    log = get_run_logger()
    methods = list(methods or DEFAULT_METHODS)
    seeds = [int(s) for s in (seeds or DEFAULT_SEEDS)]
    root = Path(project_dir).resolve()
    params = validate_inputs(root)
    check_sweep(root, methods, seeds, metric)
    parent = tracking.start_parent_run(root, params, run_name="sweep",
                                       tags={"gkd.flow": "sweep", "methods": ",".join(methods),
                                             "seeds": ",".join(map(str, seeds))})
    status = "FAILED"
    try:
        for stage in ("prepare_data", "train_teacher"):
            stage_task.with_options(**stage_options(stage))(str(root), stage, parent)
        futures = [
            sweep_point_task.submit(method, seed, str(root), POINTS_DIR, parent, threads_per_worker)
            for method in methods for seed in seeds
        ]
        points = [f.result() for f in futures]
        files = write_comparison(points, methods, root / OUT_DIR, metric)
        run = tracking.StageRun(tracking.get_client(root), parent, root)
        for path in files.values():
            run.log_artifact(path, "sweep")
        status = "FINISHED"
    finally:
        tracking.end_run(root, parent, status)
    log.info("sweep of %d points done: %s", len(points), files["md"])
    return {"parent_run_id": parent, "points": points, "files": files}


def main(
    methods: str = ",".join(DEFAULT_METHODS),
    seeds: str = ",".join(map(str, DEFAULT_SEEDS)),
    project_dir: Path = Path("."),
    workers: int = 2,
    metric: str = "test_accuracy",
) -> None:
    """Run a sweep of comma-separated methods x seeds and print the comparison table."""
    configure_logging()
    root = project_dir.resolve()
    method_list = [m.strip() for m in methods.split(",") if m.strip()]

    def checked_seeds() -> list[int]:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
        validate_inputs(root)
        check_sweep(root, method_list, seed_list, metric)
        return seed_list

    seed_list = run_cli(checked_seeds, report=logger.error)
    workers = max(1, workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    result = sweep.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))(
        method_list, seed_list, str(root), metric, threads)
    Console().print(Markdown(Path(result["files"]["md"]).read_text()))


if __name__ == "__main__":
    typer.run(main)
