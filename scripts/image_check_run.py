"""The live half of scripts/image_check.sh: the built image's own CMD as the gpu pool's Prefect worker.

    python scripts/image_check_run.py --image localhost/gkd-pipeline:cuda [--keep]

On this host: a Prefect server, an MLflow tracking server, a "cpu box" checkout (a clone of this repository's
HEAD with a local-folder DVC remote) and its cpu process worker; the deployments of flows/deployments.py.
In the image (``buildah run``, chroot isolation, the host's network): the image's CMD and user, a "gpu box"
checkout of the same commit mounted at /app as compose.yaml mounts one. Then the nightly deployment runs with
``runtime.device=cpu`` (an uncommitted params edit, which travels with the run): its GPU stages must run on
the image's worker, the student must be registered, and the image's HEALTHCHECK command must pass while the
worker runs and fail once it stopped. Figures go to stdout as ``figure: <name> = <value>``; exit 1 on a
failed check. Uses the integration tests' server helpers (tests/integration/_servers.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from _project import edit_params, git  # noqa: E402
from _servers import free_port, mlflow_server, prefect_server, running, tool_env, wait_for, worker_polled  # noqa: E402

logger = logging.getLogger("image_check")
BUILDAH = ["buildah", "--storage-driver", "vfs"]
CONTAINER_UID = 1000  # the image's USER
# the checkouts belong to the image's user, and this script runs as root: git must accept both owners
GIT_SAFE = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*"}
FLOW_TIMEOUT_S = 1800


class CheckFailed(RuntimeError):
    pass


def figure(name: str, value: object) -> None:
    print(f"figure: {name} = {value}", flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)
    logger.info("ok: %s", what)


def sh(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def image_config(image: str) -> dict:
    """The image's docker config (CMD, HEALTHCHECK, USER) from ``buildah inspect``."""
    return json.loads(sh([*BUILDAH, "inspect", "--type", "image", image]))["Docker"]["config"]


def checkouts(work: Path) -> tuple[Path, Path, Path]:
    """The cpu box (this repository's HEAD, with a DVC remote), the gpu box (a clone of it, owned by the
    image's user) and the remote both use."""
    cpu, gpu, remote = work / "cpu-box", work / "gpu-box", work / "dvc-remote"
    sh(["git", "clone", "--quiet", str(ROOT), str(cpu)])
    for key, value in (("user.email", "image-check@example.invalid"), ("user.name", "image check")):
        git(cpu, "config", key, value)
    remote.mkdir()
    sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], cwd=cpu, env=tool_env())
    sh(["git", "commit", "--quiet", "-am", "the shared DVC remote"], cwd=cpu)
    sh(["git", "clone", "--quiet", str(cpu), str(gpu)])
    shutil.chown(remote, CONTAINER_UID, CONTAINER_UID)
    for path in [gpu, *gpu.rglob("*")]:
        os.lchown(path, CONTAINER_UID, CONTAINER_UID)
    # the run's settings: every stage on the CPU and short, as an uncommitted edit that travels with the run
    edit_params(cpu, {"runtime.device": "cpu", "teacher.train.epochs": 1, "student.train.epochs": 1,
                      "teacher.train.warmup_epochs": 0, "student.train.warmup_epochs": 0})
    return cpu, gpu, remote


@contextlib.contextmanager
def container(image: str) -> Iterator[str]:
    name = sh([*BUILDAH, "from", "--quiet", image]).strip()
    try:
        yield name
    finally:
        subprocess.run([*BUILDAH, "rm", name], capture_output=True)


def in_container(ctr: str, mounts: list[tuple[Path, str, str]], env: dict[str, str], cmd: list[str]) -> list[str]:
    """``buildah run`` argv: ``cmd`` in ``ctr`` as the image's user in its workdir, with ``mounts`` and ``env``."""
    argv = [*BUILDAH, "run", "--isolation", "chroot"]
    for host, inside, mode in mounts:
        argv += ["--volume", f"{host}:{inside}:{mode}"]
    for key, value in env.items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, ctr, "--", *cmd]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (servers' logs, checkouts)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    os.environ.update({**GIT_SAFE, "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    os.umask(0)  # folders this side makes in the shared DVC remote stay writable for the image's user (uid 1000)
    work = Path(tempfile.mkdtemp(prefix="gkd-image-check-", dir="/var/tmp"))
    work.chmod(0o755)
    config = image_config(args.image)
    worker_cmd = config["Cmd"]
    health = config.get("Healthcheck") or {}
    check(bool(worker_cmd) and worker_cmd[:3] == ["prefect", "worker", "start"], f"the image's CMD is a Prefect "
          f"worker: {worker_cmd}")
    check(health.get("Test", [""])[0] == "CMD", f"the image keeps its HEALTHCHECK: {health.get('Test')}")
    try:
        return run_checks(args.image, work, worker_cmd, health["Test"][1:])
    except CheckFailed as err:
        logger.error("FAILED: %s (logs in %s)", err, work)
        args.keep = True
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run_checks(image: str, work: Path, worker_cmd: list[str], health_cmd: list[str]) -> int:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    cpu, gpu, remote = checkouts(work)
    logs = work / "logs"
    logs.mkdir()
    with prefect_server(work / "prefect") as server, \
            mlflow_server(f"sqlite:///{work / 'mlflow.db'}", work / "mlflow-artifacts", logs) as tracking:
        client_env = server.client_env({"MLFLOW_TRACKING_URI": tracking})
        sh([sys.executable, "-m", "flows.deployments"], cwd=cpu, env=client_env)
        health_port = str(free_port())
        env = {"PREFECT_API_URL": server.api_url, "MLFLOW_TRACKING_URI": tracking, "GKD_PROJECT_DIR": "/app",
               "GKD_RUNS_DIR": "/tmp/gkd-runs", "PREFECT_WORKER_WEBSERVER_PORT": health_port,
               "PREFECT_WORKER_QUERY_SECONDS": "2", **GIT_SAFE}
        mounts = [(gpu, "/app", "rw"), (cpu, str(cpu), "ro"), (remote, str(remote), "rw")]
        cpu_worker = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "cpu"]
        with container(image) as ctr, \
                running("cpu worker", cpu_worker, logs / "cpu-worker.log",
                        {**client_env, "GKD_PROJECT_DIR": str(cpu)}, cwd=cpu):
            t0 = time.time()
            with running("image worker", in_container(ctr, mounts, env, worker_cmd), logs / "image-worker.log",
                         tool_env()) as image_worker:
                wait_for(lambda: worker_polled(server, "gpu", t0), 300, "the image's worker polling the gpu pool")
                figure("worker_start_seconds", round(time.time() - t0, 1))
                healthy = subprocess.run(in_container(ctr, [], env, health_cmd), capture_output=True, text=True)
                check(healthy.returncode == 0, f"the HEALTHCHECK command passes while the worker runs "
                      f"({healthy.stderr.strip()[-300:]})")

                t1 = time.time()
                with server.client_settings():
                    run = run_deployment("gkd-pipeline/nightly", timeout=FLOW_TIMEOUT_S)
                    with get_client(sync_client=True) as client:
                        gpu_runs = [r for r in client.read_flow_runs() if r.work_pool_name == "gpu"]
                figure("flow_seconds", round(time.time() - t1, 1))
                check(bool(run.state and run.state.is_completed()),
                      f"the nightly run completed ({run.state.name if run.state else None}: "
                      f"{(run.state.message or '')[:300] if run.state else ''}); image worker log tail: "
                      f"{image_worker.output(1500)}")
                stages = sorted(r.parameters.get("stage", "?") for r in gpu_runs
                                if r.state and r.state.is_completed())
                check(stages == ["distill_student", "train_teacher"], f"the GPU stages ran on the image's worker "
                      f"({stages})")
                log = (logs / "image-worker.log").read_text()
                check(all(f"submitting flow run '{r.id}'" in log for r in gpu_runs), "... as the image's "
                      "worker's log shows")
            unhealthy = subprocess.run(in_container(ctr, [], env, health_cmd), capture_output=True, text=True)
            check(unhealthy.returncode != 0, "the HEALTHCHECK command fails once the worker stopped")

        mv = MlflowClient(tracking).get_model_version_by_alias("gkd-student", "challenger")
        check(mv.tags.get("data_sha256", "") != "", f"version {mv.version} of gkd-student is registered with "
              "its data hash")
        figure("registered_version", mv.version)
        check(git(gpu, "status", "--porcelain").stdout.strip() == "", "the gpu box's checkout is untouched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
