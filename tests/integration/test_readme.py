"""README.md and the command lines agree: every command of every fenced ```bash block of the README runs, in
order, in a copy of the test project (the pipeline has run there, as after `make run`).

A few commands cannot run as written here; they are listed in REDUCED (run in a reduced form derived from
the README's own command line, so a command that stops parsing still fails) or NOT_RUN (with the reason and
the test that covers them instead). An entry for a command the README no longer shows fails the test too, so
the lists stay in step with the README. Servers (`mlflow ui`, `mlflow models serve`) are started on a free
port, must answer, and are stopped.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from PIL import Image

from _project import REPO, console_script, git
from _servers import free_port, http_ok, running, tool_env

pytestmark = pytest.mark.integration
README = REPO / "README.md"
COMMAND_TIMEOUT = 900


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order: comments stripped, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = _strip_comment(raw).strip()
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line:
                commands.append(line)
    return commands


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, at the start or after a blank)."""
    quote: Optional[str] = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _make_dry_run(cmd: str) -> str:
    return cmd.replace("make ", "make -n ", 1)  # the target exists and the Makefile parses


def _sweep_reduced(cmd: str) -> str:
    """The README's sweep with its first two methods and first seed, one epoch, one worker."""
    args = shlex.split(cmd)
    out, i = [], 0
    while i < len(args):
        flag = args[i]
        out.append(flag)
        i += 1
        if flag in ("--methods", "--seeds"):
            values = []
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
            out += values[:2 if flag == "--methods" else 1]
    return shlex.join(out + ["--workers", "1", "-S", "student.train.epochs=1", "--name", "readme-docs"])


def _with_port(cmd: str, port: int) -> str:
    """A server command on ``port``: the README's ``-p``/``--port`` value replaced, or ``--port`` added."""
    args = shlex.split(cmd)
    for flag in ("-p", "--port"):
        if flag in args:
            args[args.index(flag) + 1] = str(port)
            return shlex.join(args)
    return shlex.join([*args, "--port", str(port)])


# README command -> (how it runs here, why)
REDUCED: dict[str, tuple[Callable[[str], str], str]] = {
    "make run": (_make_dry_run, "sets up .venv and runs the whole pipeline: the pipeline's flow run is the "
                 "session fixture (tests/integration/conftest.py::pipeline_run); here `make -n`"),
    "make test": (_make_dry_run, "the test suite itself; here `make -n`"),
    "python -m flows.sweep --methods none kd linear gompertz --seeds 0 1 2": (
        _sweep_reduced, "4 methods x 3 seeds of training; run with its first 2 methods, 1 seed, 1 epoch"),
}
SERVERS: dict[str, str] = {  # README command prefix -> the path that must answer
    "mlflow ui": "/health",
    "mlflow models serve": "/ping",
}
NOT_RUN: dict[str, str] = {
    ". .venv/bin/activate": "the environment: the test already runs with the venv's bin first on PATH",
    "PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deployments":
        "needs a running Prefect server; tests/integration/test_deployments.py and test_scheduling.py run it "
        "against a real `prefect server start`",
    "prefect worker start --pool cpu": "a long-running worker; test_scheduling.py runs one against a real server",
    "prefect worker start --pool gpu": "a worker for the GPU pool (same command as the cpu one, another pool)",
    "python -m flows.tune --preset fashion-mnist --methods kd gompertz_kd gompertz --trials 20 --workers 2":
        "60 trainings on Fashion-MNIST; tests/integration/test_tune.py runs this command line on the digits-smoke "
        "preset (3 trials, then resumed to 5, on 2 workers)",
    "python -m flows.sweep --preset fashion-mnist --tuned":
        "30 trainings on Fashion-MNIST after a search; test_tune.py runs `flows.sweep --preset digits-smoke --tuned`",
}

# cheap checks of what a command printed, by prefix (the dedicated tests check the rest)
EXPECT: dict[str, Callable[[str, Path], None]] = {}


def expects(prefix: str) -> Callable[[Callable[[str, Path], None]], Callable[[str, Path], None]]:
    def register(check: Callable[[str, Path], None]) -> Callable[[str, Path], None]:
        EXPECT[prefix] = check
        return check
    return register


@expects("dvc metrics diff")
def _no_failed_revision(output: str, root: Path) -> None:
    assert "failed to load" not in output, output
    assert "test_accuracy" in output, output


@expects("dvc exp run")
def _says_not_logged_to_mlflow(output: str, root: Path) -> None:
    assert "not logged to MLflow" in output, output[-3000:]


@expects("dvc metrics show")
def _numbers_only(output: str, root: Path) -> None:
    assert "max_abs_diff_e6" in output and "sha256" not in output and "gompertz" not in output, output


@expects("dvc plots show")
def _offline_page(output: str, root: Path) -> None:
    html = (root / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and "vega@5.20.2" in html


@expects("python -m flows.promote")
def _no_temporary_server(output: str, root: Path) -> None:
    assert "Starting temporary server" not in output and "decision:" in output, output


@expects("gkd predict --model models/student.pt --split test")
def _split_accuracy_is_evaluates(output: str, root: Path) -> None:
    accuracy = json.loads((root / "reports" / "evaluate.json").read_text())["test_accuracy"]
    assert f"accuracy {accuracy:.4f}" in output, output


def test_readme_lists_agree_with_the_readme() -> None:
    commands = readme_commands(README.read_text())
    assert commands, "no ```bash blocks found in README.md"
    stale = [c for c in (*REDUCED, *NOT_RUN) if c not in commands]
    assert not stale, f"listed here but no longer in README.md: {stale}"
    assert len(commands) == len(set(commands)), "a command appears twice: the run order would be ambiguous"


def _inputs_the_readme_assumes(root: Path) -> None:
    """`images/` and `images.tar.gz` (the README's gkd predict examples): PNGs of a few test images."""
    from gkd_core.data import load_prepared

    data = load_prepared(root / "data" / "prepared.pt")
    with tarfile.open(root / "images.tar.gz", "w:gz") as tf:
        for i, img in enumerate(data.test_x[:20].numpy()):
            buf = io.BytesIO()
            Image.fromarray(img[0]).save(buf, format="PNG")
            path = root / "images" / f"{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(buf.getvalue())
            info = tarfile.TarInfo(f"images/{i:03d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.mark.timeout(3600)  # two `dvc exp run`s, a sweep, three trainings and two servers, in sequence
def test_every_readme_command_runs(clone_project, tmp_path: Path) -> None:
    root: Path = clone_project()
    for name in ("Makefile", "pyproject.toml", "requirements.lock", "README.md"):
        shutil.copy2(REPO / name, root / name)
    # as after `make run` in a fresh clone: the outputs are there, dvc.lock is not committed yet
    git(root, "add", "Makefile", "pyproject.toml", "requirements.lock", "README.md")
    git(root, "rm", "-q", "--cached", "dvc.lock")  # not commit_all: its `git add -A` would add dvc.lock back
    git(root, "commit", "-q", "--no-verify", "-m", "the project as cloned: no dvc.lock")
    assert "dvc.lock" not in git(root, "ls-files").stdout.split()
    before = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff"], cwd=root, capture_output=True, text=True,
                            env=tool_env(), timeout=COMMAND_TIMEOUT)
    assert "failed to load some metrics for following revisions: 'HEAD'" in before.stdout + before.stderr
    _inputs_the_readme_assumes(root)
    bin_dir = console_script("gkd", tmp_path / "bin").parent
    env = tool_env({"PATH": f"{bin_dir}:{tool_env()['PATH']}"},
                   drop=("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "GKD_MLFLOW_PARENT_RUN_ID"))

    timings: list[tuple[str, float, str]] = []
    for cmd in readme_commands(README.read_text()):
        t0 = time.perf_counter()
        if cmd in NOT_RUN:
            timings.append((cmd, 0.0, "not run: " + NOT_RUN[cmd]))
            continue
        server = next((path for prefix, path in SERVERS.items() if cmd.startswith(prefix)), None)
        if server is not None:
            port = free_port()
            args = shlex.split(_with_port(cmd, port))
            with running(cmd, args, tmp_path / f"server-{port}.log", env, cwd=root,
                         ready=lambda: http_ok(f"http://127.0.0.1:{port}{server}"), timeout=300):
                pass
            timings.append((cmd, time.perf_counter() - t0, f"started on port {port}, answered {server}, stopped"))
            continue
        how, form = cmd, "as written"
        if cmd in REDUCED:
            how = REDUCED[cmd][0](cmd)
            form = f"reduced to `{how}`: {REDUCED[cmd][1]}"
        proc = subprocess.run(["bash", "-c", f"set -eo pipefail; {how}"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed ({proc.returncode}): {how}\n{output[-4000:]}"
        for prefix, check in EXPECT.items():
            if cmd.startswith(prefix):
                check(output, root)
        timings.append((cmd, time.perf_counter() - t0, form))
    report = "\n".join(f"{seconds:7.1f} s  {cmd}  [{form}]" for cmd, seconds, form in timings)
    print(f"README commands, in order:\n{report}")
