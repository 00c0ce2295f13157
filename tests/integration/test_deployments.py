"""Deployments register against a real Prefect API: cron schedules, work pools "cpu" and "gpu"."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_deployments_have_schedules_and_pools(prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments

    ids = apply_deployments("/srv/gkd-pipeline")
    with get_client(sync_client=True) as client:
        pools = {p.name: p.type for p in client.read_work_pools()}
        assert pools.get("cpu") == "process" and pools.get("gpu") == "process"
        deployments = {}
        for dep_id in ids:
            d = client.read_deployment(dep_id)
            flow = client.read_flow(d.flow_id)
            deployments[f"{flow.name}/{d.name}"] = d
    assert set(deployments) == {"gkd-pipeline/nightly", "gkd-stage/gpu", "gkd-sweep/weekly", "gkd-sweep-point/gpu",
                                "gkd-promote/daily", "gkd-tune/tune-fashion-mnist", "gkd-tune-trials/gpu"}
    pools_of = {k: d.work_pool_name for k, d in deployments.items()}
    assert pools_of == {"gkd-pipeline/nightly": "cpu", "gkd-stage/gpu": "gpu", "gkd-sweep/weekly": "cpu", "gkd-sweep-point/gpu": "gpu",
                        "gkd-promote/daily": "cpu", "gkd-tune/tune-fashion-mnist": "cpu", "gkd-tune-trials/gpu": "gpu"}
    crons = {k: [s.schedule.cron for s in d.schedules] for k, d in deployments.items()}
    assert crons["gkd-pipeline/nightly"] == ["0 2 * * *"] and crons["gkd-stage/gpu"] == []
    assert crons["gkd-sweep/weekly"] == ["0 4 * * 0"] and crons["gkd-promote/daily"] == ["30 6 * * *"]
    assert crons["gkd-tune/tune-fashion-mnist"] == []  # manual trigger
    assert deployments["gkd-pipeline/nightly"].entrypoint == "flows.pipeline.pipeline"
    assert deployments["gkd-pipeline/nightly"].parameters["gpu_dispatch"] == "deployment"
    assert deployments["gkd-stage/gpu"].job_variables == {"working_dir": "/srv/gkd-pipeline"}  # pinned: one box
    assert deployments["gkd-sweep/weekly"].parameters == {"preset": "fashion-mnist", "gpu_dispatch": "deployment"}


def test_deployments_name_no_machine_path_by_default(prefect_harness: None) -> None:
    """Without --project-dir each worker finds its own checkout ($GKD_PROJECT_DIR); the gpu pool runs one flow
    run per GPU."""
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments

    ids = apply_deployments(None, gpus=2)
    with get_client(sync_client=True) as client:
        assert all(client.read_deployment(i).job_variables == {} for i in ids)
        assert client.read_work_pool("gpu").concurrency_limit == 2
