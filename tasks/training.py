"""What the two training stages (train_teacher, distill_student) write besides their JSON report: the model
file with its metrics, the per-epoch history CSV and the learning-curve PNG."""

from __future__ import annotations

import os
from typing import Any, Mapping

from gkd_core.plots import plot_learning_curves
from gkd_core.runner import save_model
from tasks.reports import write_history_csv


def write_trained_model(result: Any, model_cfg: Any, data: Any, metrics: Mapping[str, Any],
                        model_path: str | os.PathLike, history_csv: str | os.PathLike,
                        curves_png: str | os.PathLike, title: str) -> None:
    """``result`` is the runner's training result (``.model``, ``.history``); ``metrics`` go into the model
    file's metadata."""
    save_model(result.model, model_cfg, data, model_path, extra=dict(metrics))
    write_history_csv(history_csv, result.history)
    plot_learning_curves(result.history, curves_png, title)
