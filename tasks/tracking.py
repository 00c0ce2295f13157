"""MLflow plumbing: tracking URI, experiment, the pipeline's parent run, one nested run per stage.

* Tracking URI: ``MLFLOW_TRACKING_URI`` or, by default, ``sqlite:///<project>/mlflow.db`` (a database store:
  the model registry needs one) with artifacts in ``<project>/mlartifacts/<experiment>``.
* The pipeline flow creates the parent run and hands its id to the stage processes through the
  ``GKD_MLFLOW_PARENT_RUN_ID`` environment variable. A stage that sees it opens a nested run, logs every
  per-epoch metric live (the training callback), then its reports and plots. A stage that DVC skipped as up
  to date gets a nested run replayed from its output files, tagged ``cached=true``.
* Without a parent id, stages log nothing: plain ``dvc repro`` needs no MLflow.

Runs are driven through ``MlflowClient`` with explicit run ids (no fluent "active run"), so this works the
same from Prefect task threads and from stage subprocesses. mlflow is imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from tasks import common
from tasks.stages import DATA_REPORT, PREPARED, STAGES, StageSpec

logger = logging.getLogger(__name__)

PARENT_ENV = "GKD_MLFLOW_PARENT_RUN_ID"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
_BATCH = 100  # MLflow's log_batch limit for params and tags (metrics: 1000)


def tracking_uri(root: str | os.PathLike = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store (absolute, so any cwd works)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{(Path(root).resolve() / DEFAULT_DB).as_posix()}"


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")) or "://" not in uri


def get_client(root: str | os.PathLike = "."):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(root))


def ensure_experiment(client: Any, name: str, root: str | os.PathLike = ".") -> str:
    """The experiment's id, creating it with artifacts under ``<project>/mlartifacts/<name>`` for a
    database store without a server (a tracking server chooses its own artifact root)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if is_local_store(client.tracking_uri):
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        location = (Path(root).resolve() / DEFAULT_ARTIFACTS / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def base_tags(root: str | os.PathLike = ".") -> dict[str, str]:
    """Provenance tags: git commit (and dirtiness), DVC's md5 of the prepared data, gkd's data hash."""
    tags: dict[str, str] = {}
    commit = common.git_commit(root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    dirty = common.git_dirty(root)
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    md5 = common.dvc_lock_md5(root, PREPARED)
    if md5:
        tags["dvc_data_md5"] = md5
    data_report = Path(root) / DATA_REPORT
    if data_report.is_file():
        try:
            data_hash = common.read_json(data_report).get("hash")
        except ValueError:
            data_hash = None
        if data_hash:
            tags["data_hash"] = str(data_hash)
    return tags


@contextlib.contextmanager
def fluent_mlflow(uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.pytorch.log_model`` needs it) at ``uri`` / ``experiment_id`` for
    the block, then put the process back: ``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` also write
    MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID into os.environ, which would leak into every later stage
    and flow run of a long-lived process (a Prefect worker, a test session)."""
    import mlflow

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


class StageRun:
    """One MLflow run driven by id. ``StageRun(None, None)`` is the disabled run: every call is a no-op."""

    def __init__(self, client: Any, run_id: Optional[str], root: str | os.PathLike = "."):
        self.client = client
        self.run_id = run_id
        self.root = Path(root)
        self._pending: list[Any] = []
        self._step: Optional[int] = None
        self._callback_failed = False

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    # The engine's callback: (name, value, step) for every metric every epoch; sent once per epoch.
    def callback(self, name: str, value: float, step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._pending.append(Metric(_metric_key(name), float(value), int(time.time() * 1000), int(step)))

    def flush(self) -> None:
        """Send the buffered metrics. A tracking hiccup during training is logged, not fatal."""
        if not self.enabled or not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            self.client.log_batch(self.run_id, metrics=pending)
        except Exception as err:  # noqa: BLE001 - observability must not kill a long training run
            if not self._callback_failed:
                logger.warning("MLflow metric logging failed (training continues): %s", err)
            self._callback_failed = True

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), ts, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_file(self, rel_path: str) -> bool:
        """Log ``<root>/<rel_path>`` under its own folder (``reports/plots/x.png`` -> ``reports/plots``)."""
        path = self.root / rel_path
        if not self.enabled or not path.is_file():
            return False
        parent = Path(rel_path).parent.as_posix()
        self.log_artifact(path, None if parent in ("", ".") else parent)
        return True

    def log_history(self, history: list[Mapping[str, float]]) -> None:
        """Per-epoch metrics with step = epoch (how the live callback logs them)."""
        for row in history:
            step = int(row.get("epoch", 0))
            for k, v in row.items():
                if k != "epoch" and v is not None and math.isfinite(float(v)):
                    self.callback(k, float(v), step)
        self.flush()


def log_stage_files(run: StageRun, spec: StageSpec, replay_history: bool = False,
                    paths: Optional[Mapping[str, str]] = None) -> None:
    """Log a stage's outputs: metrics JSON (flattened numbers as metrics + the file), plots, ONNX.

    ``paths`` maps the default relative paths of ``spec`` to the paths actually written (sweeps write
    elsewhere); ``replay_history`` also logs the per-epoch CSVs as stepped metrics (cached stages).
    """
    if not run.enabled:
        return
    where = dict(paths or {})
    for rel in spec.metrics:
        actual = where.get(rel, rel)
        file = run.root / actual
        if file.is_file():
            run.log_metrics(common.flatten_numeric(common.read_json(file)))
            run.log_file(actual)
    for rel in spec.history:
        actual = where.get(rel, rel)
        if replay_history and (run.root / actual).is_file():
            run.log_history(common.read_history_csv(run.root / actual))
        run.log_file(actual)
    for rel in spec.artifacts + spec.log_models:
        run.log_file(where.get(rel, rel))


def create_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, MLFLOW_RUN_NAME: run_name})
    return run.info.run_id


def start_parent_run(root: str | os.PathLike, params: Any, run_name: str,
                     tags: Optional[Mapping[str, str]] = None) -> str:
    """Create the pipeline's parent run (all params, provenance tags); returns its id. Ended by
    :func:`end_run`."""
    client = get_client(root)
    exp_id = ensure_experiment(client, params.mlflow.experiment, root)
    run_id = create_run(client, exp_id, run_name, {**base_tags(root), **(tags or {})})
    StageRun(client, run_id, root).log_params(common.flatten_params(params.model_dump(mode="json")))
    logger.info("MLflow parent run %s in experiment %r (%s)", run_id, params.mlflow.experiment,
                client.tracking_uri)
    return run_id


def end_run(root: str | os.PathLike, run_id: str, status: str = "FINISHED") -> None:
    get_client(root).set_terminated(run_id, status)


def set_run_tags(root: str | os.PathLike, run_id: str, tags: Mapping[str, Any]) -> None:
    StageRun(get_client(root), run_id, root).set_tags(tags)


@contextlib.contextmanager
def stage_run(stage: str, root: str | os.PathLike = ".", parent_run_id: Optional[str] = None,
              params: Any = None, cached: bool = False, run_name: Optional[str] = None,
              tags: Optional[Mapping[str, str]] = None) -> Iterator[StageRun]:
    """A nested run for ``stage`` under ``parent_run_id`` (or ``$GKD_MLFLOW_PARENT_RUN_ID``).

    With no parent it yields a disabled :class:`StageRun` and MLflow is not even imported. The run ends
    FINISHED, or FAILED (and the error propagates) when the body raises.
    """
    parent_run_id = parent_run_id or os.environ.get(PARENT_ENV, "").strip() or None
    if not parent_run_id:
        yield StageRun(None, None, root)
        return
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = get_client(root)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run_tags = {**base_tags(root), MLFLOW_PARENT_RUN_ID: parent_run_id, "gkd.stage": stage,
                "cached": str(cached).lower(), **(tags or {})}
    run = StageRun(client, create_run(client, experiment_id, run_name or stage, run_tags), root)
    if params is not None:
        flat = common.flatten_params(params.model_dump(mode="json"))
        run.log_params(common.select_params(flat, common.stage_param_keys(root, stage)))
    try:
        yield run
    except BaseException:
        run.flush()
        client.set_terminated(run.run_id, "FAILED")
        raise
    run.flush()
    client.set_terminated(run.run_id, "FINISHED")


def log_cached_stage(stage: str, root: str | os.PathLike, parent_run_id: str, params: Any = None) -> str:
    """A nested run for a stage DVC did not rerun, replayed from its output files (tag cached=true)."""
    with stage_run(stage, root, parent_run_id, params=params, cached=True) as run:
        log_stage_files(run, STAGES[stage], replay_history=True)
    return run.run_id


def find_stage_runs(root: str | os.PathLike, parent_run_id: str) -> dict[str, Any]:
    """The nested runs of a parent, by stage name (the latest per stage when a retry made several)."""
    client = get_client(root)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    out: dict[str, Any] = {}
    for r in runs:
        out[r.data.tags.get("gkd.stage", r.info.run_name)] = r
    return out
