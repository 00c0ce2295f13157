"""Real server processes for the integration tests: Prefect server and workers, MLflow tracking server,
PostgreSQL. Each helper is a context manager that starts the process in its own process group, waits (bounded)
until it answers, and on exit stops the whole group (SIGTERM, then SIGKILL), also when the body failed.

    with prefect_server(tmp) as server:                       # PREFECT_HOME and sqlite database under tmp
        with server.client_settings():                        # in-process Prefect client -> this server
            ...
        with prefect_worker(server, ["--pool", "cpu"], tmp):  # a `prefect worker start` process
            ...
    with postgres(tmp) as uri, mlflow_server(uri, tmp / "artifacts", tmp) as url:
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from _project import OFFLINE_ENV, REPO

BIN = Path(sys.executable).parent
POSTGRES_SH = REPO / "scripts" / "postgres.sh"
STARTUP_TIMEOUT = 180.0  # seconds: a server's first start on 2 busy cores (database migrations included)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(extra: Optional[dict[str, str]] = None, drop: Sequence[str] = ()) -> dict[str, str]:
    """The environment for a child process: telemetry off, this interpreter's bin first on PATH."""
    env = {**os.environ, **OFFLINE_ENV}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    for key in drop:
        env.pop(key, None)
    env.update(extra or {})
    return env


@dataclass
class Process:
    """A child process in its own process group, output in ``log``."""

    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the group, SIGKILL after ``grace`` seconds; returns once the leader has exited."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # the leader may be gone while children of the group linger (uvicorn workers, flow-run subprocesses)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def start_process(name: str, cmd: Sequence[str], log: Path, env: dict[str, str],
                  cwd: Optional[Path] = None) -> Process:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return Process(name, popen, log)


@contextlib.contextmanager
def running(name: str, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Optional[Path] = None,
            ready: Optional[Callable[[], bool]] = None, timeout: float = STARTUP_TIMEOUT) -> Iterator[Process]:
    """Start ``cmd``, wait until ``ready()`` (bounded), yield, then stop the process group whatever happened."""
    proc = start_process(name, cmd, log, env, cwd)
    try:
        if ready is not None:
            wait_for(lambda: _ready_or_dead(proc, ready), timeout, f"{name} to start",
                     on_timeout=lambda: proc.output())
        yield proc
    finally:
        proc.stop()


def _ready_or_dead(proc: Process, ready: Callable[[], bool]) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.output()}")
    return ready()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.5,
             on_timeout: Optional[Callable[[], str]] = None) -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}\n{detail}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(url: str, timeout: float = 10.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# --- Prefect ------------------------------------------------------------------------------------------------

PREFECT_CLIENT_VARS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "PREFECT_HOME",
                       "PREFECT_API_DATABASE_CONNECTION_URL")


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: Process
    env: dict[str, str] = field(repr=False)

    def client_env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        """Environment for a process that talks to this server (a worker, a flow run, a CLI call)."""
        return tool_env({"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home), **(extra or {})},
                        drop=PREFECT_CLIENT_VARS)

    @contextlib.contextmanager
    def client_settings(self) -> Iterator[None]:
        """Point this process's Prefect client (get_client, deployment.apply, run_deployment) here."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield


@contextlib.contextmanager
def prefect_server(tmp: Path, port: Optional[int] = None,
                   extra_env: Optional[dict[str, str]] = None) -> Iterator[PrefectServer]:
    """``prefect server start --host 127.0.0.1 --port <free>`` with its own PREFECT_HOME and sqlite database
    under ``tmp``; every server service (the scheduler included) runs as in production."""
    port = port or free_port()
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = tool_env({
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        **(extra_env or {}),
    }, drop=("PREFECT_API_URL", "PREFECT_PROFILE"))
    api_url = f"http://127.0.0.1:{port}/api"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running("prefect server", cmd, tmp / "prefect-server.log", env,
                 ready=lambda: http_ok(f"{api_url}/health")) as proc:
        yield PrefectServer(api_url, home, proc, env)


def worker_polled(server: PrefectServer, pool: str, since: float) -> bool:
    """True once a worker of ``pool`` sent a heartbeat (it polls the pool) after epoch second ``since``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        with server.client_settings(), get_client(sync_client=True) as client:
            workers = client.read_workers_for_work_pool(pool)
    except (ObjectNotFound, PrefectHTTPStatusError):  # the pool does not exist yet: the worker creates it
        return False
    return any(w.last_heartbeat_time and w.last_heartbeat_time.timestamp() >= since for w in workers)


@contextlib.contextmanager
def prefect_worker(server: PrefectServer, args: Sequence[str], tmp: Path, name: str = "worker",
                   cwd: Optional[Path] = None, extra_env: Optional[dict[str, str]] = None,
                   cmd: Optional[Sequence[str]] = None, pool: Optional[str] = None) -> Iterator[Process]:
    """``prefect worker start <args>`` (or the exact ``cmd``) against ``server``, yielded once it polls
    ``pool`` (taken from ``--pool`` in ``args``/``cmd``)."""
    cmd = list(cmd) if cmd else [str(BIN / "prefect"), "worker", "start", *args]
    if pool is None and "--pool" in cmd:
        pool = cmd[cmd.index("--pool") + 1]
    env = server.client_env({"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                             "PREFECT_WORKER_HEARTBEAT_SECONDS": "5", **(extra_env or {})})
    since = time.time() - 1
    ready = (lambda: worker_polled(server, pool, since)) if pool else None
    with running(f"prefect worker ({' '.join(cmd[1:])})", cmd, tmp / f"{name}.log", env, cwd=cwd,
                 ready=ready, timeout=120) as proc:
        yield proc


# --- PostgreSQL and MLflow ----------------------------------------------------------------------------------

def postgres_missing_reason() -> Optional[str]:
    """None when PostgreSQL's binaries are here (installing them with scripts/postgres.sh install when we
    can), else why not: the reason a test skips with."""
    if subprocess.run(["bash", str(POSTGRES_SH), "bindir"], capture_output=True).returncode == 0:
        return None
    try:
        proc = subprocess.run(["bash", str(POSTGRES_SH), "install"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "PostgreSQL is not installed and `scripts/postgres.sh install` timed out (no apt access?)"
    if proc.returncode != 0:
        return ("PostgreSQL is not installed and `scripts/postgres.sh install` failed: "
                + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return None


@contextlib.contextmanager
def postgres(db: str = "mlflow") -> Iterator[str]:
    """A new PostgreSQL cluster on 127.0.0.1:<free port> with database ``db``; yields its URI. The cluster
    lives in its own /tmp folder (the postgres user must reach it; pytest's temp root is private)."""
    cluster = Path(tempfile.mkdtemp(prefix="gkd-pg-"))
    try:
        proc = subprocess.run(["bash", str(POSTGRES_SH), "start", str(cluster), str(free_port()), db],
                              capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise AssertionError(f"postgres.sh start failed:\n{proc.stdout}\n{proc.stderr}")
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(POSTGRES_SH), "stop", str(cluster)], capture_output=True, timeout=120)
        shutil.rmtree(cluster, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, tmp: Path, workers: int = 2) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:<free port> over ``backend_uri`` with served artifacts in ``artifacts``;
    yields the tracking URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--artifacts-destination",
           str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    with running("mlflow server", cmd, tmp / "mlflow-server.log", tool_env(drop=("MLFLOW_TRACKING_URI",)),
                 cwd=tmp, ready=lambda: http_ok(f"{url}/health")):
        yield url
