"""Prefect deployments: cron schedules and the "cpu" / "gpu" work pools.

    python -m flows.deployments                  # create the work pools (if missing) and the deployments
    prefect worker start --pool cpu              # on a CPU box with this repository checked out
    prefect worker start --pool gpu              # on each GPU box

| deployment            | flow          | pool | schedule (UTC)          |
|-----------------------|---------------|------|-------------------------|
| gkd-pipeline/nightly  | pipeline      | cpu  | 02:00 daily             |
| gkd-stage/gpu         | one DVC stage | gpu  | none: dispatched by the pipeline (gpu_dispatch="deployment") |
| gkd-sweep/weekly      | sweep         | gpu  | 04:00 Sundays           |
| gkd-promote/daily     | promote       | cpu  | 06:30 daily             |

The nightly pipeline runs on the CPU pool and sends train_teacher and distill_student to the GPU pool; the
DVC remote carries the data between the machines (``dvc remote add -d ...``), and MLFLOW_TRACKING_URI must
point every worker at the same tracking server. Deployments use module entrypoints (``flows.pipeline:pipeline``):
workers run in a checkout of this repository (``working_dir`` job variable), no image build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound

from flows.pipeline import pipeline, stage_flow
from flows.promote import promote
from flows.sweep import sweep
from tasks.cli import configure_logging

logger = logging.getLogger(__name__)

WORK_POOLS = {"cpu": "process", "gpu": "process"}


def build_deployments(project_dir: Optional[str] = None) -> list[tuple[RunnerDeployment, str]]:
    """``(deployment, work pool)`` pairs. ``project_dir`` becomes the workers' working directory."""
    job_vars: dict[str, Any] = {"working_dir": project_dir} if project_dir else {}
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "job_variables": job_vars}
    return [
        (pipeline.to_deployment(name="nightly", cron="0 2 * * *", work_pool_name="cpu",
                                parameters={"register_model": True, "promote": True, "gpu_dispatch": "deployment"},
                                tags=["cpu"], description="Nightly pipeline; GPU stages on the gpu pool.",
                                **common), "cpu"),
        (stage_flow.to_deployment(name="gpu", work_pool_name="gpu", tags=["gpu"],
                                  description="One DVC stage (train_teacher, distill_student) on a GPU worker.",
                                  **common), "gpu"),
        (sweep.to_deployment(name="weekly", cron="0 4 * * 0", work_pool_name="gpu", tags=["gpu"],
                             description="Methods x seeds comparison.", **common), "gpu"),
        (promote.to_deployment(name="daily", cron="30 6 * * *", work_pool_name="cpu", tags=["cpu"],
                               description="Promote the challenger when it beats the champion.", **common), "cpu"),
    ]


def ensure_work_pools() -> None:
    """Create the "cpu" and "gpu" process work pools when missing."""
    with get_client(sync_client=True) as client:
        for name, pool_type in WORK_POOLS.items():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
                logger.info("created work pool %s (%s)", name, pool_type)


def apply_deployments(project_dir: Optional[str] = None) -> list[str]:
    """Create or update every deployment; returns their ids."""
    ensure_work_pools()
    ids = []
    for deployment, pool in build_deployments(project_dir):
        ids.append(str(deployment.apply(work_pool_name=pool)))
        logger.info("deployment %s/%s on pool %s", deployment.flow_name, deployment.name, pool)
    return ids


def main(project_dir: Optional[str] = None) -> None:
    """Register the work pools and deployments with the Prefect API in PREFECT_API_URL. Workers run the flows
    in ``--project-dir`` (default: this checkout's absolute path), which must hold the repository there."""
    configure_logging()
    apply_deployments(project_dir or str(Path.cwd().resolve()))


if __name__ == "__main__":
    typer.run(main)
