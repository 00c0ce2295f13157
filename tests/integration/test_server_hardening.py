"""The shared servers as compose.yaml configures them, run for real: the Prefect server with CSRF protection on
and CORS limited to its UI's origin, MLflow's basic-auth app with the admin password from the environment and
no secret on its command line, and the check that refuses example or weak secrets before anything starts."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from _project import REPO
from _servers import BIN, free_port, http_ok, prefect_server, running, tool_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
             body: bytes | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}


@pytest.mark.parametrize("value, ok", [("change-me", False), ("", False), ("short-but-real", False),
                                       ("0123456789abcdef0123", True)])
def test_example_missing_or_short_secrets_are_refused(value: str, ok: bool) -> None:
    env = tool_env({"POSTGRES_PASSWORD": value, "MLFLOW_ADMIN_PASSWORD": "a-good-long-password-1234",
                    "MLFLOW_SECRET_KEY": "another-good-long-key-5678"})
    proc = subprocess.run([sys.executable, str(REPO / "scripts/check_secrets.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode == 0) is ok, proc.stderr
    if not ok:
        assert proc.stderr.startswith("check_secrets: POSTGRES_PASSWORD (") and "MLFLOW_ADMIN" not in proc.stderr
        assert value == "" or value not in proc.stderr  # never the value itself


def test_prefect_server_refuses_cross_site_requests(tmp_path: Path) -> None:
    hardening = {k: v for k, v in COMPOSE["services"]["prefect-server"]["environment"].items()
                 if k.startswith("PREFECT_SERVER_API_")}
    assert hardening["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    with prefect_server(tmp_path, extra_env=hardening) as server:
        api = server.api_url
        # what a web page could send: a POST without the CSRF token the Prefect client fetches first
        status, _ = _request(f"{api}/flows/", "POST", {"Content-Type": "application/json"},
                             json.dumps({"name": "from-a-web-page"}).encode())
        assert status == 403
        # a browser's preflight from another origin gets no permission; the UI's own origin does
        _, evil = _request(f"{api}/flows/", "OPTIONS", {"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
        assert evil.get("access-control-allow-origin") != "http://evil.example" and \
            evil.get("access-control-allow-origin") != "*"
        _, ui = _request(f"{api}/flows/", "OPTIONS", {"Origin": "http://127.0.0.1:4200",
                                                      "Access-Control-Request-Method": "POST"})
        assert ui.get("access-control-allow-origin") == "http://127.0.0.1:4200"
        # Prefect's own client (workers, flows, deployments) fetches the token and works
        script = "from prefect import flow\n@flow\ndef f():\n    return 41 + 1\nprint('result', f())\n"
        proc = subprocess.run([sys.executable, "-c", script], env=server.client_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and "result 42" in proc.stdout, proc.stderr[-3000:]


def test_mlflow_basic_auth_with_the_password_off_the_command_line(tmp_path: Path) -> None:
    service = COMPOSE["services"]["mlflow"]
    assert service["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    ini = (REPO / "docker/mlflow-auth.ini").read_text().replace("sqlite:////mlflow-auth/basic_auth.db",
                                                                   f"sqlite:///{tmp_path / 'auth.db'}")
    (tmp_path / "auth.ini").write_text(ini)
    password = "admin-password-0123456789"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = tool_env({"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                    "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-0123456789abcdef"},
                   drop=("MLFLOW_TRACKING_URI",))
    cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--artifacts-destination",
           str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with running("mlflow basic-auth", cmd, tmp_path / "mlflow.log", env, cwd=tmp_path,
                 ready=lambda: http_ok(f"{url}/health")) as proc:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _request(search)[0] == 401
        wrong = base64.b64encode(b"admin:not-the-password").decode()
        assert _request(search, headers={"Authorization": f"Basic {wrong}"})[0] == 401
        right = base64.b64encode(f"admin:{password}".encode()).decode()
        assert _request(search, headers={"Authorization": f"Basic {right}"})[0] == 200
        # the pipeline's client logs in from the environment, as compose.yaml's workers do
        script = ("import mlflow; mlflow.set_experiment('hardening'); "
                  "r = mlflow.start_run(); mlflow.log_metric('m', 1.0); mlflow.end_run(); print('logged')")
        client_env = tool_env({"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin",
                               "MLFLOW_TRACKING_PASSWORD": password})
        logged = subprocess.run([sys.executable, "-c", script], env=client_env, capture_output=True, text=True,
                                timeout=300)
        assert logged.returncode == 0 and "logged" in logged.stdout, logged.stderr[-2000:]
        anonymous = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                   env=tool_env({"MLFLOW_TRACKING_URI": url}, drop=("MLFLOW_TRACKING_USERNAME",
                                                                                    "MLFLOW_TRACKING_PASSWORD")))
        assert anonymous.returncode != 0
        cmdline = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes().decode(errors="replace")
        assert password not in cmdline and "mlflow.db" not in cmdline  # `ps` shows neither
