"""DVC from Python: run one stage if DVC says it is out of date, read the stage graph, move data through
the remote (the hand-off between machines).

``Repo().reproduce(targets=[stage], single_item=True)`` runs the stage's command only when its deps, params
or outs changed, and returns the stages that actually ran; the flows call stages one at a time in
dependency order so each stage gets its own retries, GPU routing and MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from dvc.repo import Repo

from gkd_core.cli_support import ERROR_FILE_ENV
from tasks import tracking

logger = logging.getLogger(__name__)
_PROCESS_STATE = threading.RLock()  # guards os.environ / cwd changes made for DVC


@contextlib.contextmanager
def open_repo(root: str | os.PathLike) -> Iterator[Any]:
    """The DVC repository at ``root``, with the process inside it: DVC resolves targets and output paths
    against the working directory, so a flow started elsewhere (or a test) must not leave it outside."""
    # `import dvc` gives the "dvc" logger its own console handler: no second copy through the root logger,
    # and no "git add ..." hints (the flow does not commit; people do).
    logging.getLogger("dvc").propagate = False
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)
    with _PROCESS_STATE:
        previous = os.getcwd()
        os.chdir(root)
        try:
            with Repo(str(root)) as repo:
                yield repo
        finally:
            os.chdir(previous)


def stage_names(root: str | os.PathLike) -> list[str]:
    """dvc.yaml's stages in the order DVC reads them (the file's order), checked to be a valid run order:
    every stage comes after the stages it depends on."""
    with open_repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in repo.index.stages if s.cmd]
        seen: set[Any] = set()
        for s in stages:
            late = [d.addressing for d in graph.successors(s) if d not in seen]
            if late:
                raise ValueError(f"dvc.yaml lists stage {s.addressing} before its dependencies {late}")
            seen.add(s)
        return [s.addressing for s in stages]


def stage_upstream(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{stage: [stages it depends on directly]}`` from DVC's graph."""
    with open_repo(root) as repo:
        graph = repo.index.graph
        return {s.addressing: sorted(d.addressing for d in graph.successors(s))
                for s in repo.index.stages if s.cmd}


@contextlib.contextmanager
def stage_environment(root: str | os.PathLike, parent_run_id: Optional[str],
                      extra: Optional[dict[str, str]] = None) -> Iterator[None]:
    """Environment for stage commands run by DVC: this interpreter's ``python`` first on PATH, the MLflow
    tracking URI made explicit, the parent run id when there is one, and ``extra``. Restored afterwards."""
    updates = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(root),
        tracking.PARENT_ENV: parent_run_id or "",
        **(extra or {}),
    }
    with _PROCESS_STATE:
        saved = {k: os.environ.get(k) for k in updates}
        os.environ.update(updates)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class StageFailed(RuntimeError):
    """A stage command failed. ``retryable`` is False for the failures a rerun repeats (bad input, a diverged
    run: the stage wrote its cause to ``$GKD_ERROR_FILE``) and True for a crash (it may be transient)."""

    def __init__(self, stage: str, message: str, kind: str, exit_code: Optional[int], retryable: bool):
        self.stage, self.kind, self.exit_code, self.retryable = stage, kind, exit_code, retryable
        super().__init__(message)


def reproduce_stage(root: str | os.PathLike, stage: str, force: bool = False) -> bool:
    """Run ``stage`` (not its upstream) if DVC finds it out of date; True when it actually ran."""
    with open_repo(root) as repo:
        ran = repo.reproduce(targets=[stage], single_item=True, force=force)
    return any(s.addressing == stage for s in ran)


def run_stage(root: str | os.PathLike, stage: str, parent_run_id: Optional[str] = None, params: Any = None,
              force: bool = False) -> dict[str, Any]:
    """Reproduce one stage through DVC. With a parent MLflow run, a stage that ran logged its own nested
    run (live); one that DVC skipped gets a nested run replayed from its outputs (``cached=true``)."""
    t0 = time.perf_counter()
    logger.info("stage %s: dvc repro (runs it if its deps, params or outputs changed)", stage)
    fd, error_file = tempfile.mkstemp(prefix=f"gkd-{stage}-", suffix=".json")
    os.close(fd)
    os.unlink(error_file)  # the stage writes it only when it fails with a known cause
    try:
        with stage_environment(root, parent_run_id, {ERROR_FILE_ENV: error_file}):
            ran = reproduce_stage(root, stage, force=force)
    except Exception as err:  # noqa: BLE001 - DVC wraps the command's failure in its own exception types
        cause = _read_cause(error_file)
        if cause is not None:
            raise StageFailed(stage, f"stage {stage} failed: {cause['error']}", cause.get("kind", "user_input"),
                              cause.get("exit_code"), retryable=False) from None
        raise StageFailed(stage, f"stage {stage} failed: {err}", "crash", None, retryable=True) from err
    finally:
        Path(error_file).unlink(missing_ok=True)
    run_id = None
    if parent_run_id and not ran:
        run_id = tracking.log_cached_stage(stage, root, parent_run_id, params=params)
    seconds = time.perf_counter() - t0
    logger.info("stage %s: %s in %.1f s", stage, "ran" if ran else "up to date (cached)", seconds)
    return {"stage": stage, "ran": ran, "cached": not ran, "seconds": round(seconds, 2), "cached_run_id": run_id}


def _read_cause(path: str) -> Optional[dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def push(root: str | os.PathLike, targets: Sequence[str], remote: Optional[str] = None) -> int:
    """Upload the cached outputs of ``targets`` (stage names or paths) to the DVC remote."""
    with open_repo(root) as repo:
        return int(repo.push(targets=list(targets), remote=remote) or 0)


def pull(root: str | os.PathLike, targets: Sequence[str], remote: Optional[str] = None) -> None:
    """Download and check out the outputs of ``targets`` from the DVC remote."""
    with open_repo(root) as repo:
        repo.pull(targets=list(targets), remote=remote)


def has_remote(root: str | os.PathLike) -> bool:
    with open_repo(root) as repo:
        return bool(repo.config.get("core", {}).get("remote") or repo.config.get("remote"))
