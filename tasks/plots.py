"""The CSV twins of the pipeline's plots (the PNGs are gkd_core.plots'): the schedule curve, and the confusion
matrix as the (actual, predicted) rows `dvc plots` expects. Every file is written atomically."""

from __future__ import annotations

import os
from typing import Any, Sequence

from tasks.common import write_rows_csv


def write_schedule_csv(schedule: Any, path: str | os.PathLike, points: int = 101) -> None:
    """``progress,weight`` on an even grid over [0, 1] (the curve the student trained under)."""
    from gkd_core.schedules import schedule_curve

    xs, ys = schedule_curve(schedule, points)
    write_rows_csv(path, ["progress", "weight"], ((round(x, 6), y) for x, y in zip(xs, ys)))


def write_confusion_csv(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike) -> None:
    """One ``actual,predicted`` row per test image (DVC's confusion template counts them)."""
    rows = []
    for i, counts in enumerate(confusion):
        for j, n in enumerate(counts):
            rows.extend([(classes[i], classes[j])] * int(n))
    write_rows_csv(path, ["actual", "predicted"], rows)
