"""Flow parameters sent through the API of a real `prefect server start` process to a real gpu worker: each
hostile value fails its flow run at the start with one line naming the parameter, and the worker's project
is left as it was (tasks/flow_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _project import git, make_project
from _servers import PrefectServer, prefect_worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_WAIT = 300  # seconds: flow-run processes starting on 2 busy cores

HOSTILE = [  # (deployment, parameters, what the failed run's message must say)
    ("gkd-sweep-point/gpu", {"sweep_name": "../..", "arm": "kd", "seed": 0},
     "sweep_name='../..': expected a name of letters, digits"),
    ("gkd-sweep-point/gpu", {"sweep_name": "ok", "arm": "../../models", "seed": 0},
     "arm='../../models': expected a name"),
    ("gkd-stage/gpu", {"stage": "train_teacher", "git_commit": "--upload-pack=touch /tmp/gkd-pwned"},
     "git_commit='--upload-pack=touch /tmp/gkd-pwned': expected a full commit id"),
    ("gkd-stage/gpu", {"stage": "train_teacher", "git_commit": "main"}, "git_commit='main': expected a full commit id"),
    ("gkd-stage/gpu", {"stage": "train_teacher", "project_dir": "/"},
     "project_dir='/': a run created through a deployment must stay inside this worker's project"),
    ("gkd-stage/gpu", {"stage": "../../x"}, "stage='../../x': expected one of prepare_data"),
    ("gkd-tune-trials/gpu", {"preset": "../..", "method": "kd", "n_trials": 1, "budget": 1},
     "preset='../..': expected a name"),
    ("gkd-tune-trials/gpu", {"preset": "digits-smoke", "method": "kd", "n_trials": 10 ** 9, "budget": 1},
     "n_trials=1000000000, budget=1, worker=0: expected 1..10000"),
    ("gkd-stage/gpu", {"stage": "train_teacher", "parent_run_id": "x' OR 1=1"},
     "parent_run_id=\"x' OR 1=1\": expected an MLflow run id"),
]


def test_hostile_flow_parameters_fail_their_runs_and_touch_nothing(live_prefect: PrefectServer,
                                                                   tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.deployments import apply_deployments

    project = make_project(tmp_path / "project")
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*") if ".git" not in p.parts)
    with live_prefect.client_settings():
        apply_deployments(None)  # the worker finds its project through GKD_PROJECT_DIR
        with prefect_worker(live_prefect, ["--pool", "gpu", "--name", "api-inputs-gpu"], tmp_path,
                            name="gpu-worker", extra_env={"GKD_PROJECT_DIR": str(project)}) as worker:
            runs = [(run_deployment(name, parameters=params, timeout=0), expected) for name, params, expected in HOSTILE]
            with get_client(sync_client=True) as client:
                final = {}

                def all_finished() -> bool:
                    for run, _ in runs:
                        final[run.id] = client.read_flow_run(run.id)
                    return all(r.state is not None and r.state.is_final() for r in final.values())

                wait_for(all_finished, RUN_WAIT, "the hostile runs to finish", interval=2,
                         on_timeout=lambda: worker.output(6000))
    for run, expected in runs:
        state = final[run.id].state
        assert state.is_failed(), (run.parameters, state)
        assert expected in (state.message or ""), (expected, state.message, worker.output(3000))
    assert not Path("/tmp/gkd-pwned").exists()
    assert git(project, "status", "--porcelain").stdout.strip() == ""  # not a file changed or added
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if ".git" not in p.parts) == before
