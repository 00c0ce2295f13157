"""Every PNG the project draws: learning curves, distillation-weight schedules, a confusion matrix, the sweep's
comparison chart.

Object-oriented matplotlib only (``Figure`` + the Agg canvas): no pyplot, no ``matplotlib.use``, so nothing
changes matplotlib's global state for the rest of the process. Every file is written atomically
(:func:`gkd_core.io.atomic_path`). The CSV twins of these plots (what ``dvc plots`` reads) are written by the
pipeline (tasks/reports.py).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gkd_core.io import atomic_path
from gkd_core.schedules import GompertzSchedule, Schedule, schedule_curve

logger = logging.getLogger(__name__)

__all__ = ["plot_learning_curves", "plot_schedules", "plot_confusion_matrix", "plot_comparison"]


def _figure(width: float, height: float, dpi: int = 110) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike, dpi: int | None = None) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


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


def plot_schedules(schedules: Sequence[Schedule], path: str | os.PathLike,
                   title: str = "Distillation weight w(p)") -> None:
    """w(p) of each schedule over training progress, one line each (Gompertz labelled with a, w0, p*)."""
    fig = _figure(6, 3.6, dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for s in schedules:
        xs, ys = schedule_curve(s)
        label = s.name
        if isinstance(s, GompertzSchedule):
            label = f"gompertz (a={s.a:.3g}, w0={s.w0:.2g}, p*={s.p_inflection:.2f})"
        ax.plot(xs, ys, label=label)
    ax.set_xlabel("training progress p")
    ax.set_ylabel("w(p)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_confusion_matrix(
    cm: torch.Tensor | Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | os.PathLike,
    normalize: bool = True,
    title: str = "Confusion matrix",
) -> None:
    """A heat map of ``cm[true, predicted]``.

    With ``normalize`` each row is divided by its total (recall per class); cells are annotated when there
    are at most 20 classes.
    """
    counts = torch.as_tensor(cm, dtype=torch.float64).cpu()
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix shape {tuple(counts.shape)} does not match {n} class names")
    values = counts / counts.sum(dim=1, keepdim=True).clamp(min=1) if normalize else counts
    size = max(4.0, 0.45 * n + 2.0)
    fig = _figure(size + 1.0, size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values.numpy(), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        threshold = float(values.max()) / 2.0 if values.numel() else 0.0
        for i in range(n):
            for j in range(n):
                v = float(values[i, j])
                ax.text(
                    j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if v > threshold else "black",
                )
    _save(fig, path, dpi=120)
    logger.info("wrote confusion matrix plot %s", path)


def comparison_figure(rows: Sequence[Mapping[str, Any]], metric: str, title: str) -> Any:
    """Every seed's ``metric`` per arm (dots) with the arm's mean ± std (rows ``{method, mean, std, values}``).

    No bars: a bar drawn from a cut-off axis exaggerates differences, one drawn from 0 hides them. The y-axis
    spans every value with a margin, so no seed is clipped and the spread is visible next to the differences.
    """
    fig = _figure(max(4.5, 0.9 * len(rows) + 2.5), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    values: list[float] = []
    for i, r in enumerate(rows):
        vals = [float(v) for v in r.get("values", []) if v is not None and math.isfinite(float(v))]
        values += vals
        ax.scatter([i] * len(vals), vals, color="black", s=14, zorder=3, label="seed" if i == 0 else None)
        if r.get("mean") is not None:
            ax.errorbar([i + 0.18], [r["mean"]], yerr=[r.get("std") or 0.0], fmt="o", color="tab:blue", capsize=4,
                        label="mean ± std" if i == 0 else None)
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.1 * (hi - lo), 0.005)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(rows)), labels=[r["method"] for r in rows], rotation=25, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if values:
        ax.legend(fontsize=7, loc="best")
    return fig


def plot_comparison(rows: Sequence[Mapping[str, Any]], metric: str, path: str | os.PathLike, title: str) -> None:
    """:func:`comparison_figure` as a PNG."""
    _save(comparison_figure(rows, metric, title), path)