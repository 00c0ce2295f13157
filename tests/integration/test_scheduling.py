"""Scheduling for real: a `prefect server start` process (tests/integration/_servers.py) whose own scheduler
service must create the future runs of every cron deployment, and a `prefect worker start --pool cpu`
process that must execute a triggered deployment run to Completed.

Both fail when the server's scheduler is broken: with SQLAlchemy 2.1.x prefect 3.8.8's scheduler logs
"Can't evaluate bulk DML statement" and creates no run at all (hence the pin in pyproject.toml / the lock).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from _project import make_project
from _servers import PrefectServer, prefect_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTC = dt.timezone.utc
# deployment -> (hour, minute, weekday or None for every day) of its cron schedule, UTC
CRON = {
    "gkd-pipeline/nightly": (2, 0, None),
    "gkd-promote/daily": (6, 30, None),
    "gkd-sweep/weekly": (4, 0, 6),  # Sunday
}
SCHEDULER_WAIT = 120  # seconds; the scheduler looks at recently changed deployments every 5 s
RUN_WAIT = 300  # seconds for a worker to pick up a run and finish it (a fresh flow-run process on 2 cores)


def _deployment_names(client, ids: list[str]) -> dict[str, str]:
    names = {}
    for dep_id in ids:
        d = client.read_deployment(dep_id)
        names[f"{client.read_flow(d.flow_id).name}/{d.name}"] = dep_id
    return names


def _scheduled_runs(client, deployment_id: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50)


def test_scheduler_creates_future_runs_for_each_cron_deployment(live_prefect: PrefectServer, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments

    with live_prefect.client_settings():
        ids = apply_deployments(str(tmp_path))
        applied_at = dt.datetime.now(UTC)
        with get_client(sync_client=True) as client:
            names = _deployment_names(client, ids)
            assert set(CRON) < set(names)
            runs: dict[str, list] = {}

            def every_cron_deployment_has_runs() -> bool:
                for name in CRON:
                    runs[name] = _scheduled_runs(client, names[name])
                return all(runs[name] for name in CRON)

            wait_for(every_cron_deployment_has_runs, SCHEDULER_WAIT,
                     "the server's scheduler to create runs for " + ", ".join(CRON), interval=2,
                     on_timeout=lambda: f"runs so far: { {k: len(v) for k, v in runs.items()} }\n"
                                        f"server log:\n{live_prefect.process.output(6000)}")
            unscheduled = _scheduled_runs(client, names["gkd-stage/gpu"])

    # runs other tests of the session created by hand (test_api_inputs.py) may exist; none by the scheduler
    assert [r for r in unscheduled if r.auto_scheduled] == [], \
        "gkd-stage/gpu has no schedule: only the pipeline dispatches to it"
    for name, (hour, minute, weekday) in CRON.items():
        period = dt.timedelta(days=7 if weekday is not None else 1)
        starts = [r.expected_start_time.astimezone(UTC) for r in runs[name]]
        assert all(r.state_type.value == "SCHEDULED" for r in runs[name]), name
        assert all(r.auto_scheduled for r in runs[name]), f"{name}: runs not made by the scheduler"
        assert starts[0] > applied_at - dt.timedelta(seconds=5), f"{name}: a run in the past: {starts[0]}"
        assert starts[0] <= applied_at + period, f"{name}: the first run {starts[0]} is not the next occurrence"
        for start in starts:
            assert (start.hour, start.minute, start.second) == (hour, minute, 0), f"{name}: {start}"
            if weekday is not None:
                assert start.weekday() == weekday, f"{name}: {start} is not a Sunday"
        assert all(b - a == period for a, b in zip(starts, starts[1:])), f"{name}: {starts}"


def test_worker_executes_a_triggered_deployment_run(live_prefect: PrefectServer, tmp_path: Path) -> None:
    """`prefect worker start --pool cpu` picks up a run of gkd-promote/daily and runs it to Completed: against
    an empty registry the promotion flow completes with a refusal."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.deployments import apply_deployments

    project = make_project(tmp_path / "project")
    with live_prefect.client_settings():
        apply_deployments(str(project))  # the workers' working_dir: this project
        with prefect_worker(live_prefect, ["--pool", "cpu", "--name", "test-cpu-worker"], tmp_path,
                            name="cpu-worker") as worker:
            run = run_deployment("gkd-promote/daily", timeout=0)  # returns once the run is created
            with get_client(sync_client=True) as client:
                state = {}

                def finished() -> bool:
                    state["run"] = client.read_flow_run(run.id)
                    return state["run"].state is not None and state["run"].state.is_final()

                wait_for(finished, RUN_WAIT, f"flow run {run.id} to finish", interval=2,
                         on_timeout=lambda: f"state: {state.get('run') and state['run'].state}\n"
                                            f"worker log:\n{worker.output(6000)}")
    final = state["run"]
    assert final.state.is_completed(), f"{final.state}\nworker log:\n{worker.output(6000)}"
    assert final.work_pool_name == "cpu"
    record = json.loads((project / "reports" / "promote.json").read_text())
    assert record["decision"] == "refused", record
