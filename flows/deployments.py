"""Prefect deployments: cron schedules and the "cpu" / "gpu" work pools.

    python -m flows.deployments                  # create the work pools (if missing) and the deployments
    prefect worker start --pool cpu              # on a CPU box with this repository checked out
    prefect worker start --pool gpu              # on each GPU box

| deployment            | flow          | pool | schedule (UTC)          |
|-----------------------|---------------|------|-------------------------|
| gkd-pipeline/nightly  | pipeline      | cpu  | 02:00 daily             |
| gkd-stage/gpu         | one DVC stage | gpu  | none: dispatched by the pipeline (gpu_dispatch="deployment") |
| gkd-sweep/weekly      | sweep         | cpu  | 04:00 Sundays: its points on the gpu pool |
| gkd-sweep-point/gpu   | one sweep point | gpu | none: dispatched by the sweep (gpu_dispatch="deployment") |
| gkd-promote/daily     | promote       | cpu  | 06:30 daily             |
| gkd-tune/tune-fashion-mnist | tune    | cpu  | none: manual trigger (its trials in the worker's processes) |
| gkd-tune-trials/gpu   | a share of a study's trials | gpu | none: dispatched by tune (gpu_dispatch="deployment") |

The scheduled deployments run one at a time each (a run that would overlap the previous one is cancelled,
``CANCEL_NEW``); each flow stops at its limit in the ``timeouts`` of the worker's params.yaml; a GPU stage or point past ``timeouts.gpu_stage`` is
cancelled and fails its parent with that cause (flows/prefect_tasks.py:run_on_gpu_pool). Promotions take
turns through the global concurrency limit ``gkd-promotion`` (created here too).

The nightly pipeline runs on the CPU pool and sends train_teacher and distill_student to the GPU pool; the
DVC remote carries the data between the machines (``dvc remote add -d ...``), and MLFLOW_TRACKING_URI must
point every worker at the same tracking server (tasks/handoff.py: what travels). Deployments use module
entrypoints (``flows.pipeline:pipeline``) and name no machine's path: each worker says where its own checkout
is, ``GKD_PROJECT_DIR=/srv/gkd prefect worker start --pool gpu --limit 1`` (one run per GPU: the gpu pool's
concurrency limit is the number of GPUs, ``--gpus``). ``--project-dir`` pins one working directory for every
worker instead (a single machine).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import typer
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound

from flows.pipeline import pipeline, stage_flow
from flows.prefect_tasks import ensure_promotion_limit
from flows.promote import promote
from flows.sweep import sweep, sweep_point_flow
from flows.tune import tune, tune_trials_flow
from tasks.cli import configure_logging

logger = logging.getLogger(__name__)

WORK_POOLS = {"cpu": "process", "gpu": "process"}


def build_deployments(project_dir: Optional[str] = None) -> list[RunnerDeployment]:
    """The deployments, each naming its work pool. ``project_dir`` (one machine only) becomes the workers' working
    directory; without it each worker finds its checkout through ``$GKD_PROJECT_DIR``. Each scheduled
    deployment runs once at a time: a run that would overlap the previous one is cancelled."""
    job_vars: dict[str, Any] = {"working_dir": project_dir} if project_dir else {}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "job_variables": job_vars}
    once = {"concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)}
    return [
        pipeline.to_deployment(
            name="nightly", cron="0 2 * * *", work_pool_name="cpu",
            parameters={"register_model": True, "promote": True, "gpu_dispatch": "deployment"},
            tags=["cpu"], description="Nightly pipeline; GPU stages on the gpu pool.", **once, **common),
        stage_flow.to_deployment(name="gpu", work_pool_name="gpu", tags=["gpu"],
                                description="One DVC stage (train_teacher, distill_student) on a GPU worker.",
                                **common),
        sweep_point_flow.to_deployment(name="gpu", work_pool_name="gpu", tags=["gpu"],
                                       description="One sweep point (arm x seed) on a GPU worker.", **common),
        tune_trials_flow.to_deployment(name="gpu", work_pool_name="gpu", tags=["gpu"],
                                       description="A share of one Optuna study's trials on a GPU worker.", **common),
        sweep.to_deployment(
            name="weekly", cron="0 4 * * 0", work_pool_name="cpu", tags=["cpu"],
            parameters={"preset": "fashion-mnist", "gpu_dispatch": "deployment"},
            description="Arms x seeds comparison (a preset of sweeps.yaml).", **once, **common),
        tune.to_deployment(
            name="tune-fashion-mnist", work_pool_name="cpu", tags=["cpu"],
            parameters={"preset": "fashion-mnist", "methods": ["kd", "gompertz_kd", "gompertz"], "trials": 20},
            description="Optuna search on validation accuracy (manual trigger; resumes its studies).", **common),
        promote.to_deployment(
            name="daily", cron="30 6 * * *", work_pool_name="cpu", tags=["cpu"],
            description="Promote the challenger when it beats the champion.", **once, **common),
    ]


def ensure_work_pools(gpus: int = 1) -> None:
    """Create the "cpu" and "gpu" process work pools when missing; the gpu pool runs at most ``gpus`` flow runs
    at a time (one per GPU)."""
    with get_client(sync_client=True) as client:
        for name, pool_type in WORK_POOLS.items():
            limit = gpus if name == "gpu" else None
            try:
                pool = client.read_work_pool(name)
                if name == "gpu" and pool.concurrency_limit != limit:
                    client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, concurrency_limit=limit))
                logger.info("created work pool %s (%s%s)", name, pool_type, f", limit {limit}" if limit else "")


def apply_deployments(project_dir: Optional[str] = None, gpus: int = 1) -> list[str]:
    """Create or update every deployment; returns their ids."""
    ensure_work_pools(gpus)
    ensure_promotion_limit()
    ids = []
    for deployment in build_deployments(project_dir):
        ids.append(str(deployment.apply(work_pool_name=deployment.work_pool_name)))
        logger.info("deployment %s/%s on pool %s", deployment.flow_name, deployment.name, deployment.work_pool_name)
    return ids


def main(project_dir: Optional[str] = typer.Option(None, help="one working directory for every worker (a "
                                                     "single machine); default: each worker's $GKD_PROJECT_DIR"),
         gpus: int = typer.Option(1, min=1, help="GPUs in the fleet: the gpu pool's concurrency limit")) -> None:
    """Register the work pools and deployments with the Prefect API in PREFECT_API_URL."""
    configure_logging()
    apply_deployments(project_dir, gpus)


if __name__ == "__main__":
    typer.run(main)
