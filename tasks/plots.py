"""Pipeline plots: learning curves from a training history, the schedule curve as CSV, the confusion
matrix as the (actual, predicted) rows `dvc plots` expects, and the sweep comparison chart.

matplotlib through ``Figure`` + the Agg canvas (no pyplot global state); every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

from gkd_core.io import atomic_path
from tasks.common import write_rows_csv

logger = logging.getLogger(__name__)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _series(history: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        v = row.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            xs.append(float(row["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_learning_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str) -> None:
    """Accuracy (train/val), the loss terms, and, when distilling, the distillation weight per epoch."""
    has_weight = any(row.get("weight", 0.0) for row in history)
    panels = 3 if has_weight else 2
    fig = _figure(4.2 * panels, 3.4)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "val")):
        axes[0].plot(*_series(history, key), marker="o", ms=3, label=label)
    axes[0].set_title("accuracy")
    for key in ("train_total", "train_ce", "train_kd", "train_wasserstein", "train_grad_match", "val_loss"):
        xs, ys = _series(history, key)
        if ys and any(ys):
            axes[1].plot(xs, ys, label=key.removeprefix("train_"))
    axes[1].set_title("loss (epoch mean)")
    if has_weight:
        axes[2].plot(*_series(history, "weight"), marker="o", ms=3, color="tab:purple")
        axes[2].set_title("distillation weight w(p)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


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


def plot_comparison(rows: Sequence[Mapping[str, Any]], metric: str, path: str | os.PathLike, title: str) -> None:
    """Bar chart of ``mean ± std`` of ``metric`` per method (rows from the sweep summary), seeds as dots."""
    fig = _figure(max(4.0, 1.1 * len(rows) + 2.0), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = [r["method"] for r in rows]
    means = [r["mean"] if r["mean"] is not None else float("nan") for r in rows]
    stds = [r["std"] or 0.0 for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
    for i, r in enumerate(rows):
        values = [v for v in r.get("values", []) if v is not None]
        ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
    finite = [m - s for m, s in zip(means, stds) if not math.isnan(m)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)
                                                                  if not math.isnan(m)) + 0.03))
    ax.set_xticks(range(len(rows)), labels=names, rotation=20)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
