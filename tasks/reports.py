"""The stages' report files other than JSON writing (gkd_core.io.write_json): per-epoch history CSVs, the
row CSVs ``dvc plots`` reads (schedule curve, confusion rows), reading JSON reports back, and the test-split
figures every stage report carries. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from gkd_core.io import atomic_write

# Column order of a history CSV; further metrics follow in first-seen order.
FIRST_COLUMNS = ("epoch", "lr", "weight", "train_total", "train_ce", "train_kd", "train_wasserstein",
                 "train_grad_match", "train_accuracy", "val_accuracy", "val_loss")


def test_metrics(ev: Mapping[str, Any]) -> dict[str, Any]:
    """The test-split figures every stage report carries, from ``gkd_core.runner.evaluate_model``'s report."""
    return {"test_accuracy": ev["accuracy"], "test_top5": ev["top5"], "test_ece": ev["ece"], "test_nll": ev["nll"]}


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


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
