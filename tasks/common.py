"""Shared plumbing of the stage modules: validated params, clean CLI errors, history CSVs, git/DVC facts."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import yaml

from gkd_core.io import atomic_write
from tasks.stages import CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# Common CLI option help texts (typer options are declared in each stage module).
PARAMS_HELP = "params.yaml to read (validated before any work)"
SET_HELP = "override a param for this run only: -S method.gompertz.c=6.0 (repeatable)"
PARENT_HELP = "MLflow run id to nest this stage's run under (the pipeline flow sets it)"


class StageInputError(Exception):
    """Bad input the user can fix (params, dataset path, model name, missing upstream file).

    Stage CLIs report it as one message on stderr and exit with code 2, before any training.
    """


def configure_logging(verbose: bool = False) -> None:
    """Plain stderr logging for stage processes (DVC and Prefect capture and show it as is)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "git", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_overrides(items: Optional[Iterable[str]]) -> dict[str, Any]:
    """``["method.name=kd", "seed=3"]`` -> ``{"method.name": "kd", "seed": 3}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise StageInputError(f"--set {item!r}: expected KEY=VALUE, e.g. method.gompertz.c=6.0")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_checked_params(
    params_path: str | os.PathLike, overrides: Optional[Mapping[str, Any]] = None, check_dataset: bool = True
):
    """Validate params.yaml (and, by default, that the dataset source exists) or raise StageInputError.

    These are the cheap checks: no data is read and nothing is written.
    """
    from gkd_core.config import ConfigError, load_params

    try:
        params = load_params(params_path, dict(overrides or {}))
    except ConfigError as err:
        raise StageInputError(str(err)) from None
    if check_dataset:
        from gkd_core.data import DatasetError, check_dataset_source

        try:
            check_dataset_source(params.dataset)
        except DatasetError as err:
            raise StageInputError(str(err)) from None
    return params


def require_file(path: str | os.PathLike, what: str, produced_by: str) -> Path:
    """The path of an upstream output, or StageInputError naming the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{what} not found: {path} (written by the {produced_by} stage; run `dvc repro {produced_by}`)")
    return path


def load_prepared_checked(path: str | os.PathLike):
    """``gkd_core.data.load_prepared`` with missing or unreadable files reported as StageInputError."""
    from gkd_core.data import DatasetError, load_prepared

    require_file(path, "prepared dataset", "prepare_data")
    try:
        return load_prepared(path)
    except (DatasetError, ValueError) as err:
        raise StageInputError(f"{path}: {err}") from None


def load_model_checked(path: str | os.PathLike, what: str, produced_by: str):
    """``gkd_core.runner.load_model`` with a missing or foreign file reported as StageInputError."""
    from gkd_core.runner import load_model

    require_file(path, what, produced_by)
    try:
        return load_model(path)
    except (FileNotFoundError, ValueError) as err:
        raise StageInputError(str(err)) from None


def run_cli(body: Callable[[], Any], verbose: bool = False) -> None:
    """Run a stage CLI body: StageInputError -> one message on stderr and exit code 2, no traceback."""
    import typer

    configure_logging(verbose)
    try:
        body()
    except StageInputError as err:
        logger.error("%s", err)
        raise typer.Exit(2) from None


# --- per-epoch history CSVs --------------------------------------------------------------------------

_FIRST_COLUMNS = ("epoch", "lr", "weight", "train_total", "train_ce", "train_kd", "train_wasserstein",
                  "train_grad_match", "train_accuracy", "val_accuracy", "val_loss")


def checkpoint_path(root: Path, name: str, data: Any) -> Path:
    """Resume state, keyed by the data's content hash (the engine's fingerprint covers the config)."""
    return root / CHECKPOINT_DIR / f"{name}-{str(data.meta.get('sha256', 'nohash'))[:16]}.pt"


def test_metrics(ev: Mapping[str, Any]) -> dict[str, Any]:
    """The test-split figures every stage report carries, from ``gkd_core.runner.evaluate_model``'s report."""
    return {"test_accuracy": ev["accuracy"], "test_top5": ev["top5"], "test_ece": ev["ece"], "test_nll": ev["nll"]}


def write_trained_model(root: Path, result: Any, model_cfg: Any, data: Any, metrics: Mapping[str, Any],
                        out: str | os.PathLike, history_csv: str | os.PathLike, curves_png: str | os.PathLike,
                        title: str) -> None:
    """A training stage's outputs: the model file (with its metrics), the per-epoch CSV, the curves PNG."""
    from gkd_core.plots import plot_learning_curves
    from gkd_core.runner import save_model

    save_model(result.model, model_cfg, data, root / out, extra=dict(metrics))
    write_history_csv(root / history_csv, result.history)
    plot_learning_curves(result.history, root / curves_png, title)


def history_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for row in history:
        keys.update(dict.fromkeys(row))
    return [c for c in _FIRST_COLUMNS if c in keys] + [c for c in keys if c not in _FIRST_COLUMNS]


def write_history_csv(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """One row per epoch, a column per metric (empty where an epoch has no value, e.g. no validation)."""
    columns = history_columns(history)
    with atomic_write(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def write_rows_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def read_history_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows written by :func:`write_history_csv`, numbers as floats, empty cells dropped."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for k, v in raw.items():
                if v not in ("", None):
                    try:
                        row[k] = float(v)
                    except ValueError:
                        continue
            rows.append(row)
    return rows


# --- facts for tags ----------------------------------------------------------------------------------


def git_commit(root: str | os.PathLike = ".") -> Optional[str]:
    """HEAD's commit hash, or None outside a git repository or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_dirty(root: str | os.PathLike = ".") -> Optional[bool]:
    """True when tracked files differ from HEAD (None when git cannot tell)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def dvc_lock_md5(root: str | os.PathLike, out_path: str) -> Optional[str]:
    """The md5 that dvc.lock records for ``out_path`` (e.g. data/prepared.pt), or None.

    Read from the lock file directly (not through the DVC API) so a stage can call it while
    ``dvc repro`` holds the repository lock.
    """
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return None
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == out_path:
                return out.get("md5")
    return None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    import json

    with open(path) as fh:
        return json.load(fh)


def flatten_numeric(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict -> ``{"a.b": 1.0}`` keeping finite numbers and bools only (what MLflow metrics take)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_numeric(v, key + "."))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> dotted keys with string values (what MLflow params take)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = str(v)
    return out


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


def set_torch_threads(n: Optional[int]) -> None:
    """Limit torch's intra-op threads (parallel sweep workers share the cores)."""
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))
