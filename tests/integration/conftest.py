"""Fixtures for the integration tests: real Prefect (test harness), real MLflow (sqlite in a temp folder),
real DVC (a temporary git repository holding a copy of the project), a tiny digits configuration.

The expensive part, one full pipeline flow run, happens once per session (``pipeline_run``); tests that
change the project work on a copy of it (``clone_project``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from _project import commit_all, make_project
from _servers import PrefectServer, prefect_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: uses the real Prefect, MLflow and DVC")


@pytest.fixture(scope="session", autouse=True)
def _isolated_tools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """DVC's site cache inside the temp folder; no MLFLOW_TRACKING_URI leaking in from the caller (each
    temp project then uses its own sqlite store)."""
    saved = {k: os.environ.get(k) for k in ("DVC_SITE_CACHE_DIR", "MLFLOW_TRACKING_URI", "GKD_MLFLOW_PARENT_RUN_ID")}
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("dvc-site-cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("GKD_MLFLOW_PARENT_RUN_ID", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def live_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real ``prefect server start`` process (own PREFECT_HOME and sqlite database, every server service
    running, the scheduler included) for the whole session; stopped at the end whatever happened."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("pipeline") / "project")


@pytest.fixture(scope="session")
def pipeline_run(pipeline_project: Path, prefect_harness: None) -> dict[str, Any]:
    """One full flow run (all stages, registration) on the tiny configuration, shared by the session."""
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    result = pipeline(str(pipeline_project), baselines=["none"])  # + the student-alone baseline
    logging.getLogger(__name__).warning("shared pipeline flow run: %.1f s", time.perf_counter() - t0)
    commit_all(pipeline_project, "pipeline outputs")  # a clean baseline for dvc exp run and clones
    return result


@pytest.fixture
def clone_project(tmp_path: Path, pipeline_run: dict[str, Any], pipeline_project: Path) -> Callable[[], Path]:
    """Copies of the pipeline project after its run (git history, DVC cache, outputs, MLflow store)."""

    def clone() -> Path:
        dest = tmp_path / f"clone{len(list(tmp_path.glob('clone*')))}"
        shutil.copytree(pipeline_project, dest, symlinks=True)
        return dest

    return clone
