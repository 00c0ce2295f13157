"""Helpers shared by the integration tests: a temporary copy of the project as a git + DVC repository,
params edits, subprocesses with this interpreter first on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT_FILES = ("gkd_core", "tasks", "flows", "dvc.yaml", "params.yaml", ".dvcignore")

FALLBACK_GITIGNORE = "__pycache__/\n/data/\n/models/\n/reports/\n/checkpoints/\nmlflow.db\n/mlartifacts/\n"

OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PYTHONUNBUFFERED": "1",
    "GIT_TERMINAL_PROMPT": "0",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

# The tiny digits configuration: a few seconds per training on 2 CPU cores, still well above chance.
TINY = {
    "teacher.model.width": 1.0,
    "teacher.train.epochs": 3,
    "teacher.train.warmup_epochs": 0,
    "teacher.train.lr": 0.1,
    "student.model.width": 0.5,
    "student.train.epochs": 3,
    "student.train.warmup_epochs": 0,
    "student.train.lr": 0.1,
    "losses.grad_match.variant": "logit",
    "losses.wasserstein.n_projections": 16,
    "runtime.device": "cpu",
    "runtime.progress_bar": False,
}


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def edit_params(root: Path, changes: dict[str, Any]) -> None:
    """Rewrite ``root/params.yaml`` with dotted-key changes."""
    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        set_dotted(data, key, value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess:
    """A command with this interpreter's bin first on PATH (so dvc.yaml's ``python`` is this venv's)."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.update(kw.pop("env", {}))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def console_script(name: str, bin_dir: Path) -> Path:
    """The console script ``name`` of pyproject's [project.scripts], written into ``bin_dir`` the way pip
    installs it, except that it imports the project from the working directory (a test project's own copy of
    the code), not from the installed tree."""
    import tomllib

    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name].split(":")
    path = bin_dir / name
    bin_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport os, sys\nsys.path.insert(0, os.getcwd())\n"
                    f"from {module} import {func}\nsys.exit({func}())\n")
    path.chmod(0o755)
    return path


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], root)


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "--no-verify", "-m", message)


def make_project(dest: Path, changes: dict[str, Any] | None = None, init_git: bool = True) -> Path:
    """A copy of the project's pipeline files in ``dest`` with the tiny params (plus ``changes``); with
    ``init_git``, a git repository with DVC initialised and everything committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    edit_params(dest, {**TINY, **(changes or {})})
    if init_git:
        git(dest, "init", "-q", "-b", "main")
        git(dest, "config", "user.email", "ci@example.invalid")
        git(dest, "config", "user.name", "gkd ci")
        git(dest, "config", "commit.gpgsign", "false")
        # the repository's own ignore rules (outputs are DVC's, never git's), so DVC behaves as it does there
        ignore = REPO / ".gitignore"
        (dest / ".gitignore").write_text(ignore.read_text() if ignore.is_file() else FALLBACK_GITIGNORE)
        dvc_init(dest)
        commit_all(dest, "project")
    return dest


def dvc_init(root: Path) -> None:
    """`dvc init` + `core.check_update false` + `core.analytics false`, in-process (no CLI start-up), and the
    repository's offline plots page (.dvc/plots_template.html, `plots.html_template` in .dvc/config)."""
    from dvc.repo import Repo

    template = REPO / ".dvc" / "plots_template.html"
    with Repo.init(str(root)) as repo:
        with repo.config.edit() as conf:
            conf["core"]["check_update"] = False
            conf["core"]["analytics"] = False
            if template.is_file():
                shutil.copy2(template, root / ".dvc" / template.name)
                conf["plots"]["html_template"] = template.name
