"""The stages' report files: the metrics JSON and its companion, per-epoch history CSVs, the row CSVs
``dvc plots`` reads (schedule curve, confusion rows), reading reports back, and the test-split figures every
stage report carries. Every file is written atomically.

A stage's report is split in two files (:func:`write_report`), so that ``dvc metrics show`` / ``diff`` and
``dvc exp show`` list only numbers worth comparing:

* ``reports/<stage>.json``, the DVC ``metrics`` file: the stage's numbers (accuracies, losses, parity, time);
* ``reports/info/<stage>.json``, a plain DVC output: everything else, text facts (method, objective, model,
  device, exporter, paths, hashes, the schedule's parameters) and the numeric details that would only widen
  the table (per-class accuracy, per-batch-size ONNX differences, counts and sizes).

:func:`read_report` reads both back as one dict (what the stages wrote before the split), which is what every
reader of a stage report uses (tasks/register.py, tasks/sweep.py, flows/pipeline.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

from gkd_core.io import atomic_write, write_json

# Column order of a history CSV; further metrics follow in first-seen order.
FIRST_COLUMNS = ("epoch", "lr", "weight", "train_total", "train_ce", "train_kd", "train_wasserstein",
                 "train_grad_match", "train_accuracy", "val_accuracy", "val_loss")


def test_metrics(ev: Mapping[str, Any]) -> dict[str, Any]:
    """The test-split figures every stage report carries, from ``gkd_core.runner.evaluate_model``'s report."""
    return {"test_accuracy": ev["accuracy"], "test_top5": ev["top5"], "test_ece": ev["ece"], "test_nll": ev["nll"]}


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


INFO_DIR = "info"  # companion files: reports/info/<name>.json next to reports/<name>.json
# Numbers that stay out of the metrics file: details and bookkeeping (they widen `dvc metrics show` without
# being what experiments are compared on); they go to the companion with the text facts.
DETAILS = frozenset({
    "per_class_accuracy", "diffs", "batch_sizes", "input_shape", "opset", "bytes", "n", "num_classes", "epochs",
    "parameters", "images_per_second", "best_val_epoch", "resumed_from_epoch", "schedule", "torch_threads",
    "epochs_trained", "stopped_at_epoch",
})


def info_path(metrics_path: str | os.PathLike) -> Path:
    """The companion of a metrics file: ``reports/x.json`` -> ``reports/info/x.json``."""
    path = Path(metrics_path)
    return path.parent / INFO_DIR / path.name


def is_metric(key: str, value: Any, details: Collection[str] = DETAILS) -> bool:
    """A finite-or-NaN number (or a bool) that is not one of the ``details``."""
    return key not in details and isinstance(value, (bool, int, float))


def split_report(report: Mapping[str, Any], details: Collection[str] = DETAILS
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, info)``: the top-level numbers (not ``details``) and everything else (text, nested, None)."""
    metrics = {k: v for k, v in report.items() if is_metric(k, v, details)}
    return metrics, {k: v for k, v in report.items() if k not in metrics}


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex): what a report says it describes (``model_sha256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_report(path: str | os.PathLike, report: Mapping[str, Any], details: Collection[str] = DETAILS) -> None:
    """Write ``report`` as the metrics file ``path`` (numbers only) and its companion :func:`info_path`."""
    metrics, info = split_report(report, details)
    write_json(info_path(path), info)
    write_json(path, metrics)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A stage report as one dict: the metrics file ``path`` and its companion (when there is one; the
    metrics win where both have a key)."""
    companion = info_path(path)
    info = read_json(companion) if companion.is_file() else {}
    return {**info, **read_json(path)}


def history_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for row in history:
        keys.update(dict.fromkeys(row))
    return [c for c in FIRST_COLUMNS if c in keys] + [c for c in keys if c not in FIRST_COLUMNS]


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return v


def write_history_csv(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """One row per epoch, a column per metric (empty where an epoch has no value, e.g. no validation)."""
    columns = history_columns(history)
    write_rows_csv(path, columns, ([_csv_value(row.get(k)) for k in columns] for row in history))


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


def write_rows_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    with atomic_write(path) as fh:
        fh.write(buf.getvalue())


def write_schedule_csv(curve: tuple[Sequence[float], Sequence[float]], path: str | os.PathLike) -> None:
    """``progress,weight`` rows of a schedule's curve (``gkd_core.schedules.schedule_curve``)."""
    xs, ys = curve
    write_rows_csv(path, ["progress", "weight"], ((round(x, 6), y) for x, y in zip(xs, ys)))


def write_confusion_csv(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike) -> None:
    """One ``actual,predicted`` row per test image (DVC's confusion template counts them)."""
    rows = []
    for i, counts in enumerate(confusion):
        for j, n in enumerate(counts):
            rows.extend([(classes[i], classes[j])] * int(n))
    write_rows_csv(path, ["actual", "predicted"], rows)
