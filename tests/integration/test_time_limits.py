"""Time limits from params.yaml: a GPU stage nobody finishes ends the pipeline with that cause and its run is
cancelled (a real `prefect server start`, the gpu pool with no live worker: a worker that died or hangs looks
the same to the waiting pipeline); the flows take their limits from the worker's params.yaml; the scheduled
deployments run one at a time."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from _project import commit_all, edit_params, make_project, run
from _servers import PrefectServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_gpu_stage_past_its_limit_ends_the_pipeline_with_the_cause(live_prefect: PrefectServer,
                                                                    tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments
    from flows.pipeline import pipeline
    from tasks.dvc_ops import StageFailed

    project = make_project(tmp_path / "project")
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], project)
    commit_all(project, "the DVC remote")
    edit_params(project, {"timeouts.gpu_stage": 15})
    with live_prefect.client_settings():
        apply_deployments(None)
        with pytest.raises(StageFailed) as failed:
            pipeline(str(project), register_model=False, gpu_dispatch="deployment")
        with get_client(sync_client=True) as client:
            gpu_runs = [r for r in client.read_flow_runs() if r.work_pool_name == "gpu"
                        and r.parameters.get("stage") == "train_teacher"
                        and str(r.id) in str(failed.value)]
    # Late: the server's name for a scheduled run past its start time
    assert re.search(r"train_teacher on the gpu pool did not finish within timeouts.gpu_stage=15 s \((Scheduled|Late)\)",
                     str(failed.value)), failed.value
    assert "was cancelled" in str(failed.value) and not failed.value.retryable
    assert len(gpu_runs) == 1 and gpu_runs[0].state.is_cancelled()
    assert not (project / "models" / "teacher.pt").exists()


def test_flows_take_their_limits_from_the_workers_params(tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    edit_params(project, {"timeouts.pipeline": 120, "timeouts.sweep": 240, "timeouts.promote": 60})
    script = ("import json; from flows.pipeline import pipeline; from flows.sweep import sweep; "
              "from flows.promote import promote; "
              "print(json.dumps([f.timeout_seconds for f in (pipeline, sweep, promote)]))")
    out = run([sys.executable, "-c", script], tmp_path, env={"GKD_PROJECT_DIR": str(project)})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [120, 240, 60]


def test_scheduled_deployments_run_one_at_a_time(prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments

    ids = apply_deployments(None)
    with get_client(sync_client=True) as client:
        deployments = {}
        for dep_id in ids:
            d = client.read_deployment(dep_id)
            deployments[f"{client.read_flow(d.flow_id).name}/{d.name}"] = d
        limits = {n: d.global_concurrency_limit.limit if d.global_concurrency_limit else None
                  for n, d in deployments.items()}
        strategies = {n: d.concurrency_options.collision_strategy.value if d.concurrency_options else None
                      for n, d in deployments.items()}
        promotion = client.read_global_concurrency_limit_by_name("gkd-promotion")
    scheduled = ("gkd-pipeline/nightly", "gkd-sweep/weekly", "gkd-promote/daily")
    assert all(limits[n] == 1 and strategies[n] == "CANCEL_NEW" for n in scheduled), (limits, strategies)
    assert limits["gkd-stage/gpu"] is None  # the gpu pool's limit (one run per GPU) governs those
    assert promotion.limit == 1
