"""Two machines on one box: a "cpu box" checkout that orchestrates and a "gpu box" checkout that two GPU workers
share (one per GPU, as docs/deploy.md advises), with a local-folder DVC remote between them, a real Prefect
server with a cpu and two gpu process workers, and a real `mlflow server` serving artifacts over HTTP. The
nightly deployment runs end to end; a third process reads the registered student and its ONNX model through
the tracking server only. Every GPU flow run works in a checkout of its own: the gpu box's checkout, where
a person works, keeps its HEAD and its uncommitted edit throughout.

Also: the pieces a GPU run depends on when it goes wrong (a worker without the remote, an unreachable
tracking server, a checkpoint that survives the worker that wrote it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from _project import REPO, commit_all, edit_params, git, make_project, run
from _servers import PrefectServer, free_port, mlflow_server, prefect_server, prefect_worker, tool_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _two_checkouts(tmp: Path) -> tuple[Path, Path, Path]:
    cpu = make_project(tmp / "cpu-box")
    remote = tmp / "dvc-remote"
    remote.mkdir()
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], cpu)
    commit_all(cpu, "the shared DVC remote")
    gpu = tmp / "gpu-box"
    run(["git", "clone", "-q", str(cpu), str(gpu)], tmp)
    for root in (cpu, gpu):
        git(root, "config", "user.email", "ci@example.invalid")
        git(root, "config", "user.name", "gkd ci")
    return cpu, gpu, remote


@dataclass
class Fleet:
    cpu: Path
    gpu: Path
    remote: Path
    server: PrefectServer
    tracking_url: str
    logs: Path
    runs: Path  # where the gpu workers make each run's checkout ($GKD_RUNS_DIR)
    gpu_head: str  # the gpu box's checkout before any run
    optuna: str  # the Optuna storage both boxes are configured with ($GKD_OPTUNA_STORAGE)

    def assert_gpu_checkout_untouched(self) -> None:
        """The checkout a person works in: same HEAD, the same uncommitted edit, no outputs, nothing new."""
        assert git(self.gpu, "rev-parse", "HEAD").stdout.strip() == self.gpu_head
        assert (self.gpu / OPERATOR_FILE).read_text().endswith(OPERATOR_EDIT)
        assert git(self.gpu, "status", "--porcelain", "--untracked-files=all").stdout.strip() == f"M {OPERATOR_FILE}"
        assert not (self.gpu / "models").exists() and not (self.gpu / "reports").exists()
        assert list(self.runs.iterdir()) == []  # every run's checkout was removed


OPERATOR_FILE = "gkd_core/__init__.py"  # tracked code
OPERATOR_EDIT = "\n# An edit in progress by the person who works in this checkout.\n"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The servers, the two checkouts and a cpu and a gpu worker, for the whole module."""
    tmp = tmp_path_factory.mktemp("fleet")
    cpu, gpu, remote = _two_checkouts(tmp)
    logs = tmp / "logs"
    logs.mkdir()
    runs = tmp / "gpu-runs"
    runs.mkdir()
    with (gpu / OPERATOR_FILE).open("a") as fh:
        fh.write(OPERATOR_EDIT)
    gpu_head = git(gpu, "rev-parse", "HEAD").stdout.strip()
    with prefect_server(tmp / "prefect") as server, \
            mlflow_server(f"sqlite:///{tmp / 'mlflow-backend.db'}", tmp / "mlflow-artifacts", logs) as tracking_url:
        with server.client_settings():
            from flows.deployments import apply_deployments

            apply_deployments(None, gpus=2)
        optuna_url = f"sqlite:///{tmp / 'optuna-shared.db'}"  # one file both "machines" reach, as a database would be
        common = {"MLFLOW_TRACKING_URI": tracking_url, "GKD_OPTUNA_STORAGE": optuna_url}
        gpu_env = {**common, "GKD_PROJECT_DIR": str(gpu), "GKD_RUNS_DIR": str(runs)}
        with prefect_worker(server, ["--pool", "cpu", "--limit", "1"], logs, name="cpu-worker",
                            extra_env={**common, "GKD_PROJECT_DIR": str(cpu)}), \
                prefect_worker(server, ["--pool", "gpu", "--limit", "1", "--name", "gpu-0"], logs,
                               name="gpu-0-worker", extra_env=gpu_env), \
                prefect_worker(server, ["--pool", "gpu", "--limit", "1", "--name", "gpu-1"], logs,
                               name="gpu-1-worker", extra_env=gpu_env):
            yield Fleet(cpu, gpu, remote, server, tracking_url, logs, runs, gpu_head, optuna_url)


def _worker_logs(fleet: Fleet) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in fleet.logs.glob("*worker.log"))


def test_nightly_pipeline_with_the_gpu_stages_on_another_checkout(fleet: Fleet, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    cpu, remote = fleet.cpu, fleet.remote
    edit_params(cpu, {"student.train.epochs": 2})  # an uncommitted params edit travels with the run
    with fleet.server.client_settings():
        flow_run = run_deployment("gkd-pipeline/nightly", timeout=1500, parameters={"promote": False})
        with get_client(sync_client=True) as client:
            gpu_runs = [r for r in client.read_flow_runs() if r.name and r.id != flow_run.id
                        and r.work_pool_name == "gpu"]
            gpu_limit = client.read_work_pool("gpu").concurrency_limit
    assert flow_run.state.is_completed(), (flow_run.state, _worker_logs(fleet))
    assert gpu_limit == 2
    assert len([r for r in gpu_runs if r.state and r.state.is_completed()]) == 2  # train_teacher, distill_student

    # the gpu runs trained in checkouts of their own at the cpu box's commit with its params: the student's
    # run config (MLflow) says 2 epochs; the gpu box's own checkout is as its user left it
    fleet.assert_gpu_checkout_untouched()
    gpu_logs = "".join(p.read_text() for p in fleet.logs.glob("gpu-*-worker.log"))
    assert gpu_logs.count(f"run checkout {fleet.runs}/") == 2, gpu_logs[-3000:]  # one per stage
    # the updated lock came back, the outputs too, and the remote holds them
    lock = yaml.safe_load((cpu / "dvc.lock").read_text())["stages"]
    assert {"prepare_data", "train_teacher", "distill_student", "evaluate", "export_onnx"} <= set(lock)
    assert lock["distill_student"]["params"]["params.yaml"]["student"]["train"]["epochs"] == 2
    assert (cpu / "models/student.pt").is_file() and (cpu / "models/teacher.pt").is_file()
    assert any(remote.rglob("*")), "nothing was pushed to the DVC remote"
    with_dvc = run([sys.executable, "-m", "dvc", "status", "--json"], cpu)
    assert json.loads(with_dvc.stdout or "{}") == {}  # the cpu box sees everything up to date

    # a third process, in an empty folder, through the tracking server only
    reader = tmp_path / "reader"
    reader.mkdir()
    script = reader / "read.py"
    script.write_text(textwrap.dedent("""
        import json, mlflow, numpy as np
        from tasks.registry import load_student
        mlflow.set_tracking_uri(__import__("os").environ["MLFLOW_TRACKING_URI"])
        model, meta = load_student("models:/gkd-student@challenger")
        mv = mlflow.MlflowClient().get_model_version_by_alias("gkd-student", "challenger")
        onnx_model = mlflow.onnx.load_model(mv.tags["onnx_model_uri"])
        exp = mlflow.get_experiment_by_name("gkd-pipeline")
        print(json.dumps({"model": type(model).__name__, "classes": len(meta.classes),
                          "onnx_inputs": [i.name for i in onnx_model.graph.input],
                          "artifact_location": exp.artifact_location}))
    """))
    out = run([sys.executable, str(script)], reader, env={"MLFLOW_TRACKING_URI": fleet.tracking_url})
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["model"] == "DigitsCNN" and facts["classes"] == 10 and facts["onnx_inputs"] == ["input"]
    assert facts["artifact_location"].startswith("mlflow-artifacts:"), facts  # served, not a local path




def test_two_gpu_workers_on_one_box_take_two_sweep_points_at_once(fleet: Fleet,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep's shared data and teacher travel through <remote>/gkd-sweeps/<name>/; its two points run at the
    same time, one on each gpu worker of the box, each in its own checkout at a commit the gpu box first has to
    fetch; the reports come back and the table is written on the orchestrating side."""
    from prefect.client.orchestration import get_client
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.sweep import build_spec, sweep

    cpu = fleet.cpu
    (cpu / "sweeps.yaml").write_text((REPO / "sweeps.yaml").read_text())
    commit_all(cpu, "sweep presets")  # a commit the gpu box does not have yet
    spec = build_spec(cpu, "digits-smoke", ["none", "kd"], ["0"], ["student.train.epochs=1"], "fleet", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fleet.tracking_url)
    with fleet.server.client_settings():
        result = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(
            spec, str(cpu), gpu_dispatch="deployment")
        with get_client(sync_client=True) as client:
            points = [r for r in client.read_flow_runs() if r.work_pool_name == "gpu"
                      and r.parameters.get("sweep_name") == "fleet"]
    rows = {r["arm"]: r for r in result["table"]["arms"]}
    assert set(rows) == {"none", "kd"} and all(r["test_accuracy"]["mean"] > 0.2 for r in rows.values())
    assert len(points) == 2 and all(r.state and r.state.is_completed() for r in points)
    first, second = sorted(points, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the two points did not run at the same time"
    logs = {p.name: p.read_text() for p in fleet.logs.glob("gpu-*-worker.log")}
    # both workers may see a scheduled run in the same poll and both log "submitting"; the server lets one move
    # it to Pending and the other logs "Aborted submission" and leaves it: count only what a worker kept
    took = {name: [r.id for r in points if f"submitting flow run '{r.id}'" in text
                   and f"Aborted submission of flow run '{r.id}'" not in text] for name, text in logs.items()}
    assert sorted(len(ids) for ids in took.values()) == [1, 1], took  # each gpu worker ran one point
    assert not (cpu / "reports/sweep/fleet/points/kd-seed0/models/student.pt").exists()  # trained elsewhere
    fleet.assert_gpu_checkout_untouched()
    assert (cpu / "reports/sweep/fleet/comparison.md").is_file()
    assert any((fleet.remote / "gkd-sweeps" / "fleet").rglob("teacher.pt"))


def test_a_search_runs_its_trials_on_the_gpu_workers(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """flows.tune with gpu_dispatch="deployment": the preset's data and teacher travel through the remote, each
    worker's share of the study runs on the gpu pool in a checkout of its own, both add to the one study of the
    shared storage; the tuned settings are written on the orchestrating side."""
    import optuna
    from prefect.client.orchestration import get_client
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.tune import tune

    cpu = fleet.cpu
    if not (cpu / "sweeps.yaml").is_file() or git(cpu, "status", "--porcelain", "sweeps.yaml").stdout.strip():
        (cpu / "sweeps.yaml").write_text((REPO / "sweeps.yaml").read_text())
        commit_all(cpu, "sweep presets for the search")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fleet.tracking_url)
    monkeypatch.setenv("GKD_OPTUNA_STORAGE", fleet.optuna)
    with fleet.server.client_settings():
        result = tune.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(
            "digits-smoke", ["kd"], 2, 2, None, {"student.train.epochs": 1}, str(cpu), "deployment")
        with get_client(sync_client=True) as client:
            shares = [r for r in client.read_flow_runs() if r.work_pool_name == "gpu"
                      and r.parameters.get("method") == "kd" and "n_trials" in r.parameters]
    study = optuna.load_study(study_name="tune-digits-smoke-kd", storage=fleet.optuna)
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 2, study.trials
    assert len(shares) == 2 and all(r.state and r.state.is_completed() for r in shares), _worker_logs(fleet)
    assert {r.parameters["worker"] for r in shares} == {0, 1}
    assert result["studies"]["kd"]["complete"] + result["studies"]["kd"]["pruned"] == 2
    tuned = yaml.safe_load((cpu / "reports/tune/digits-smoke/tuned.yaml").read_text())["methods"]["kd"]
    assert "method.kd.a" in tuned["overrides"] and tuned["fixed"] == {}  # digits-smoke gives kd no settings of its own
    assert any((fleet.remote / "gkd-sweeps" / "digits-smoke").rglob("teacher.pt"))
    fleet.assert_gpu_checkout_untouched()


def test_a_worker_checkout_without_the_dvc_remote_is_one_line(tmp_path: Path, prefect_harness: None) -> None:
    from flows.pipeline import stage_flow
    from gkd_core.cli_support import UserError

    project = make_project(tmp_path / "p")
    with pytest.raises(UserError, match="has no DVC remote"):
        stage_flow("train_teacher", str(project))


def test_an_unreachable_tracking_server_is_refused_before_any_stage(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    port = free_port()
    proc = run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], project, check=False, timeout=300,
               env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in proc.stderr
    assert not (project / "data/prepared.pt").exists()


def test_a_checkpoint_outlives_the_gpu_worker_that_wrote_it(tmp_path: Path) -> None:
    """A worker killed mid-stage on one box; the rerun on a box without its local checkpoints resumes from
    the copy mirrored to the remote and ends with the weights of an uninterrupted run."""
    first = make_project(tmp_path / "first")
    reference = make_project(tmp_path / "reference")
    for root in (first, reference):
        edit_params(root, {"student.train.epochs": 6})
        run([sys.executable, "-m", "dvc", "repro", "train_teacher"], root, timeout=900)
    run([sys.executable, "-m", "dvc", "repro", "distill_student"], reference, timeout=900)
    mirror = tmp_path / "mirror"
    env = tool_env({"GKD_CHECKPOINT_MIRROR": str(mirror)})
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "distill_student"], cwd=first, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: any(mirror.rglob("student-*.pt")), 600, "a mirrored checkpoint")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for local in (first / "checkpoints").glob("*"):
        local.unlink()  # another machine: no local resume state
    resumed = run([sys.executable, "-m", "dvc", "repro", "distill_student"], first, timeout=900,
                  env={"GKD_CHECKPOINT_MIRROR": str(mirror)})
    assert "fetched from" in resumed.stderr and "resumed" in resumed.stderr
    a = torch.load(first / "models/student.pt", weights_only=True)["state_dict"]
    b = torch.load(reference / "models/student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(mirror.rglob("student-*.pt"))  # removed once the stage finished

