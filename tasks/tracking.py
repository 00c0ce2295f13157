"""MLflow plumbing: tracking URI, experiment, the pipeline's parent run, one nested run per stage.

* Tracking URI: ``MLFLOW_TRACKING_URI`` or, by default, ``sqlite:///<project>/mlflow.db`` (a database store:
  the model registry needs one) with artifacts in ``<project>/mlartifacts/<experiment>``.
* The pipeline flow creates the parent run and hands its id to the stage processes through the
  ``GKD_MLFLOW_PARENT_RUN_ID`` environment variable. A stage that sees it opens a nested run, logs every
  per-epoch metric live (the training callback), then its reports and plots. A stage that DVC skipped as up
  to date gets a nested run replayed from its output files, tagged ``cached=true``.
* Without a parent id, stages log nothing: plain ``dvc repro`` and ``dvc exp run`` need no MLflow, and a stage
  run so says in its last line (:data:`NOT_LOGGED`), so nobody looks for it in the MLflow UI.

Runs are driven through ``MlflowClient`` with explicit run ids (no fluent "active run"), so this works the
same from Prefect task threads and from stage subprocesses. mlflow is imported on first use only (see
:func:`_mlflow`). Also here: params and metrics flattened to the dotted keys MLflow takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Mapping, Optional

import yaml
from filelock import FileLock

from gkd_core.cli_support import UserError
from tasks import provenance
from tasks.paths import DATA_REPORT, PREPARED, StagePaths
from tasks.reports import read_history_csv, read_json, read_report
from tasks.stages import STAGES, StageSpec

logger = logging.getLogger(__name__)

PARENT_ENV = "GKD_MLFLOW_PARENT_RUN_ID"
NOT_LOGGED = ("%s: not logged to MLflow (no parent run: `dvc repro` and `dvc exp run` record results in DVC only, "
              "`dvc exp show`; `python -m flows.pipeline` runs the same stages and logs each to MLflow)")
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
_BATCH = 100  # MLflow's log_batch limit for params and tags (metrics: 1000)


def _mlflow() -> ModuleType:
    """The mlflow package with the submodules used here."""
    # lazy: importing mlflow costs about as much as torch, and a stage under plain `dvc repro` never needs it
    import mlflow.entities
    import mlflow.exceptions
    import mlflow.utils.mlflow_tags

    return mlflow


def tracking_uri(root: str | os.PathLike = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite store (absolute, so any cwd works)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{(Path(root).resolve() / DEFAULT_DB).as_posix()}"


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")) or "://" not in uri


def check_reachable(root: str | os.PathLike = ".", timeout: float = 5.0) -> None:
    """Refuse, with one line and before any work, a tracking server that does not answer (a run that starts
    anyway would fail after its training, or hang in MLflow's own retries)."""
    uri = tracking_uri(root)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}): start it (docs/deploy.md) or "
                    "point MLFLOW_TRACKING_URI at one that runs")


_READY: set[str] = set()  # tracking URIs whose database this process has seen initialised


def get_client(root: str | os.PathLike = "."):
    """An ``MlflowClient`` on :func:`tracking_uri`; the first call per database creates (or migrates) its
    schema under a lock, so processes that start together against a new store do not race MLflow's table
    creation (two flows on a fresh sqlite file failed 5 of 5 times with alembic/constraint errors)."""
    uri = tracking_uri(root)
    lock = _store_lock(uri) if uri not in _READY else None
    if lock is None:
        return _mlflow().MlflowClient(uri)
    with FileLock(lock, timeout=600):
        client = _mlflow().MlflowClient(uri)  # builds the store: tables, migrations, the Default experiment
        client.search_experiments(max_results=1)
    _READY.add(uri)
    return client


def _store_lock(uri: str) -> Optional[str]:
    """The lock file guarding a database store's creation: next to a sqlite file, else in the temp folder
    (keyed by the URI; guards processes of one machine); None for a tracking server (it owns its store)."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///") + ".init.lock"
    if is_local_store(uri):
        return str(Path(tempfile.gettempdir()) / f"gkd-mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock")
    return None


def ensure_experiment(client: Any, name: str, root: str | os.PathLike = ".") -> str:
    """The experiment's id, creating it with artifacts under ``<project>/mlartifacts/<name>`` for a
    database store without a server (a tracking server chooses its own artifact root)."""
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
    except _mlflow().exceptions.MlflowException:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def base_tags(root: str | os.PathLike = ".") -> dict[str, str]:
    """Provenance tags: git commit (and dirtiness), DVC's md5 of the prepared data, gkd's data hash."""
    tags: dict[str, str] = {}
    commit = provenance.git_commit(root)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    dirty = provenance.git_dirty(root)
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    md5 = provenance.dvc_lock_md5(root, PREPARED)
    if md5:
        tags["dvc_data_md5"] = md5
    data_report = Path(root) / DATA_REPORT
    if data_report.is_file():
        try:
            data_hash = read_report(data_report).get("hash")
        except ValueError:
            data_hash = None
        if data_hash:
            tags["data_hash"] = str(data_hash)
    return tags


@contextlib.contextmanager
def fluent_mlflow(uri: str, experiment_id: Optional[str] = None) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.pytorch.log_model`` needs it) at ``uri`` / ``experiment_id`` for
    the block, then put the process back: ``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` also write
    MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID into os.environ, which would leak into every later stage
    and flow run of a long-lived process (a Prefect worker, a test session)."""
    mlflow = _mlflow()
    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    if experiment_id is not None:
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
        if self._step is not None and step != self._step:
            self.flush()
        self._step = step
        self._pending.append(_mlflow().entities.Metric(_metric_key(name), float(value), int(time.time() * 1000), int(step)))

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
        ts = int(time.time() * 1000)
        items = [_mlflow().entities.Metric(_metric_key(k), float(v), ts, step) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled or not params:
            return
        items = [_mlflow().entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        items = [_mlflow().entities.RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_file(self, rel_path: str, base: Optional[str | os.PathLike] = None) -> bool:
        """Log ``<base>/<rel_path>`` (``base``: the project root by default) under ``rel_path``'s own folder
        (``reports/plots/x.png`` -> ``reports/plots``), so a run's artifacts look the same wherever it wrote."""
        path = Path(self.root if base is None else base) / rel_path
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


def log_stage_files(run: StageRun, spec: StageSpec, paths: StagePaths, replay_history: bool = False) -> None:
    """Log a stage's outputs as written under ``paths``: metrics JSON (flattened numbers as metrics + the file),
    plots, ONNX; ``replay_history`` also logs the per-epoch CSVs as stepped metrics (cached stages)."""
    if not run.enabled:
        return
    for rel in spec.metrics:
        file = paths.output(rel)
        if file.is_file():
            run.log_metrics(flatten_numeric(read_json(file)))
            run.log_file(rel, paths.out_dir)
    for rel in spec.history:
        if replay_history and paths.output(rel).is_file():
            run.log_history(read_history_csv(paths.output(rel)))
        run.log_file(rel, paths.out_dir)
    for rel in spec.artifacts + spec.log_models:
        run.log_file(rel, paths.out_dir)


def create_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str],
               parent_run_id: Optional[str] = None) -> str:
    """A new run (nested under ``parent_run_id`` when given); returns its id."""
    mlflow_tags = _mlflow().utils.mlflow_tags
    tags = {**tags, mlflow_tags.MLFLOW_RUN_NAME: run_name}
    if parent_run_id:
        tags[mlflow_tags.MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def start_parent_run(root: str | os.PathLike, params: Any, run_name: str,
                     tags: Optional[Mapping[str, str]] = None) -> str:
    """Create the pipeline's parent run (all params, provenance tags); returns its id. Ended by
    :func:`end_run`."""
    client = get_client(root)
    exp_id = ensure_experiment(client, params.mlflow.experiment, root)
    run_id = create_run(client, exp_id, run_name, {**base_tags(root), **(tags or {})})
    StageRun(client, run_id, root).log_params(flatten_params(params.model_dump(mode="json")))
    logger.info("MLflow parent run %s in experiment %r (%s)", run_id, params.mlflow.experiment,
                client.tracking_uri)
    return run_id


def end_run(root: str | os.PathLike, run_id: str, status: str = "FINISHED") -> None:
    get_client(root).set_terminated(run_id, status)


def set_run_tags(root: str | os.PathLike, run_id: str, tags: Mapping[str, Any]) -> None:
    StageRun(get_client(root), run_id, root).set_tags(tags)


def parent_from_env(parent_run_id: Optional[str]) -> Optional[str]:
    """``parent_run_id``, else ``$GKD_MLFLOW_PARENT_RUN_ID``, else None."""
    return parent_run_id or os.environ.get(PARENT_ENV, "").strip() or None


def experiment_for(client: Any, name: str, root: str | os.PathLike, parent_run_id: Optional[str]) -> str:
    """The experiment a new run goes to: its parent's, or experiment ``name`` (created when missing)."""
    if parent_run_id:
        return client.get_run(parent_run_id).info.experiment_id
    return ensure_experiment(client, name, root)


@contextlib.contextmanager
def stage_run(stage: str, root: str | os.PathLike = ".", parent_run_id: Optional[str] = None,
              params: Any = None, cached: bool = False, run_name: Optional[str] = None,
              tags: Optional[Mapping[str, str]] = None) -> Iterator[StageRun]:
    """A nested run for ``stage`` under ``parent_run_id`` (or ``$GKD_MLFLOW_PARENT_RUN_ID``).

    With no parent it yields a disabled :class:`StageRun` and MLflow is not even imported. The run ends
    FINISHED, or FAILED (and the error propagates) when the body raises.
    """
    parent_run_id = parent_from_env(parent_run_id)
    if not parent_run_id:
        yield StageRun(None, None, root)
        logger.info(NOT_LOGGED, stage)
        return
    client = get_client(root)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run_tags = {**base_tags(root), "gkd.stage": stage, "cached": str(cached).lower(), **(tags or {})}
    run = StageRun(client, create_run(client, experiment_id, run_name or stage, run_tags, parent_run_id), root)
    if params is not None:
        flat = flatten_params(params.model_dump(mode="json"))
        run.log_params(select_params(flat, stage_param_keys(root, stage)))
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
        log_stage_files(run, STAGES[stage], StagePaths(Path(root)), replay_history=True)
    return run.run_id


# --- params and metrics as MLflow takes them ---------------------------------------------------------


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def flatten_numeric(d: Mapping[str, Any]) -> dict[str, float]:
    """Nested dict -> ``{"a.b": 1.0}`` keeping finite numbers and bools only (what MLflow metrics take)."""
    return {k: float(v) for k, v in _flatten(d)
            if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(float(v)))}


def flatten_params(d: Mapping[str, Any]) -> dict[str, str]:
    """Nested params -> dotted keys with string values (what MLflow params take)."""
    return {k: str(v) for k, v in _flatten(d)}


def select_params(flat: Mapping[str, str], keys: Iterable[str]) -> dict[str, str]:
    """The entries of ``flat`` at or under any of ``keys`` (dvc.yaml param names such as ``teacher``)."""
    keys = list(keys)
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}


def stage_param_keys(root: str | os.PathLike, stage: str) -> list[str]:
    """The params a stage lists in dvc.yaml (what its nested MLflow run logs)."""
    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        return []
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    keys: list[str] = []
    for entry in (stages.get(stage) or {}).get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, Mapping):  # {"other_params.yaml": [keys]}
            for sub in entry.values():
                keys.extend(sub or [])
    return keys
