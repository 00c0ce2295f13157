"""MLflow on PostgreSQL, as deployed (compose.yaml): a real `mlflow server` over a PostgreSQL database with
served artifacts, and two pipeline runs started at the same moment from two project copies. Nothing may be
lost: both parent runs with every nested stage run and its metrics, two registered versions, the alias.

PostgreSQL comes from Debian's packages (scripts/postgres.sh install, which .ci/run calls); where it cannot be
installed the test skips and says why. Both pipelines report to the session's real Prefect server.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from _project import make_project
from _servers import BIN, PrefectServer, mlflow_server, postgres, postgres_missing_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("prepare_data", "train_teacher", "distill_student", "evaluate", "export_onnx")
PIPELINE_TIMEOUT = 600  # seconds for the two concurrent tiny pipelines on 2 cores
MODEL = "gkd-student"


@pytest.fixture(scope="module")
def mlflow_on_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = postgres_missing_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("mlflow-postgres")
    with postgres("mlflow") as uri, mlflow_server(uri, tmp / "artifacts", tmp) as url:
        yield url


def test_two_concurrent_pipelines_lose_nothing(mlflow_on_postgres: str, live_prefect: PrefectServer,
                                               tmp_path: Path) -> None:
    from mlflow import MlflowClient

    url = mlflow_on_postgres
    projects = [make_project(tmp_path / name / "project") for name in ("a", "b")]
    env = live_prefect.client_env({"MLFLOW_TRACKING_URI": url})
    env.pop("GKD_MLFLOW_PARENT_RUN_ID", None)
    procs = []
    for project in projects:
        log = open(project.parent / "pipeline.log", "w")
        cmd = [str(BIN / "python"), "-m", "flows.pipeline", "--params", str(project / "params.yaml")]
        procs.append((subprocess.Popen(cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log, project))
    deadline = time.monotonic() + PIPELINE_TIMEOUT
    try:
        for proc, _, _ in procs:
            proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            log.close()
    outputs = [(project.parent / "pipeline.log").read_text(errors="replace") for _, _, project in procs]
    for (proc, _, project), out in zip(procs, outputs):
        assert proc.returncode == 0, f"pipeline in {project} ended {proc.returncode}:\n{out[-5000:]}"

    # what each process says it registered
    reported = []
    for out in outputs:
        m = re.search(rf"registered: models:/{MODEL}@challenger \(version (\d+)\) in (\S+)", out)
        assert m, out[-3000:]
        assert m.group(2) == url
        reported.append(m.group(1))
    assert sorted(reported) == ["1", "2"]

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("gkd-pipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("gkd.flow") == "pipeline"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    for parent in parents:
        assert "test_accuracy" in parent.data.metrics
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        stages = {r.data.tags.get("gkd.stage") for r in children}
        assert set(STAGES) <= stages, f"{parent.info.run_id}: nested runs {stages}"
        assert all(r.info.status == "FINISHED" for r in children)
        by_stage = {r.data.tags.get("gkd.stage"): r for r in children}
        for stage in ("train_teacher", "distill_student"):
            stage_run = by_stage[stage]
            assert stage_run.data.metrics, f"{stage}: no metrics"
            # every epoch of the tiny configuration (3) reached the server
            history = client.get_metric_history(stage_run.info.run_id, "val_accuracy")
            assert len(history) == 3, (stage, history)
        assert by_stage["evaluate"].data.metrics.get("test_accuracy") is not None

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    parent_ids = {p.info.run_id for p in parents}
    version_parents = set()
    for v in versions:
        run = client.get_run(v.run_id)
        version_parents.add(run.data.tags.get("mlflow.parentRunId"))
        artifacts = {a.path for a in client.list_artifacts(v.run_id)}
        assert artifacts, f"version {v.version}: no artifacts served"
    assert version_parents == parent_ids, "each pipeline registered its own student"
    alias = client.get_model_version_by_alias(MODEL, "challenger")
    assert alias.version in ("1", "2")
    assert client.get_registered_model(MODEL).aliases == {"challenger": alias.version}
