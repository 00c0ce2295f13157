"""Sweep points and the comparison table: one (method, seed) = distill_student + evaluate against the
pipeline's prepared data and teacher, every output under ``reports/sweep/points/<method>-seed<n>/`` (the
project's layout below it: models/student.pt, reports/evaluate.json, ...); the table gives mean ± std over
seeds per method.

The sweep flow (flows/sweep.py) runs the points as parallel Prefect tasks in separate processes (torch's
global RNG and thread pool are per process, so parallel points stay reproducible).
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from gkd_core.io import atomic_write, write_json
from gkd_core.plots import plot_comparison
from tasks.distill_student import distill_student
from tasks.evaluate import evaluate
from tasks.paths import PARAMS_FILE, StagePaths

logger = logging.getLogger(__name__)
POINTS_DIR = "reports/sweep/points"
SUMMARY_METRICS = ("test_accuracy", "agreement", "test_ece", "test_nll", "best_val_accuracy", "train_seconds")


def point_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def sweep_point(
    method: str,
    seed: int,
    root: str,
    work_dir: str = POINTS_DIR,
    parent_run_id: Optional[str] = None,
    threads: Optional[int] = None,
    params_path: str = PARAMS_FILE,
) -> dict[str, Any]:
    """Distil and evaluate one student with ``method.name=method`` and ``seed=seed`` under
    ``<root>/<work_dir>/<method>-seed<seed>/``; returns its metrics. ``threads`` limits torch's intra-op
    threads (parallel points share the cores; each point runs in a process of its own)."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    name = point_name(method, seed)
    out = Path(work_dir) / name
    paths = StagePaths(Path(root), out)
    overrides = {"method.name": method, "seed": seed}
    train = distill_student(paths, params_path, overrides, parent_run_id, run_name=name)
    ev = evaluate(paths, params_path, overrides, parent_run_id, run_name=f"{name}-evaluate")
    return {
        "method": method, "seed": seed, "dir": str(out),
        "test_accuracy": ev.get("test_accuracy"), "agreement": ev.get("agreement"), "test_ece": ev.get("test_ece"),
        "test_nll": ev.get("test_nll"), "best_val_accuracy": train.get("best_val_accuracy"),
        "train_seconds": train.get("train_seconds"),
    }


def _clean(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarize(points: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method (in ``methods`` order): n and, per metric, mean, std (sample, 0 for one seed) and values."""
    rows = []
    for method in methods:
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["seed"])
        row: dict[str, Any] = {"method": method, "n": len(mine), "seeds": [p["seed"] for p in mine]}
        for metric in SUMMARY_METRICS:
            vals = _clean([p.get(metric) for p in mine])
            row[metric] = {
                "mean": statistics.fmean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None),
                "values": vals,
            }
        rows.append(row)
    return rows


def _fmt(stat: dict[str, Any], digits: int = 4) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def comparison_markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    cols = [metric] + [m for m in SUMMARY_METRICS if m != metric]
    lines = [
        f"# Sweep: methods x seeds (mean ± std over seeds; sorted by the order given; primary metric `{metric}`)",
        "",
        "| method | seeds | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        digits = {"train_seconds": 1}
        lines.append(f"| {r['method']} | {r['n']} | "
                     + " | ".join(_fmt(r[c], digits.get(c, 4)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(points: Sequence[dict[str, Any]], methods: Sequence[str], out_dir: str | Path,
                     metric: str = "test_accuracy") -> dict[str, str]:
    """Write comparison.md, comparison.json and comparison.png under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    rows = summarize(points, methods)
    paths = {"md": out_dir / "comparison.md", "json": out_dir / "comparison.json", "png": out_dir / "comparison.png"}
    with atomic_write(paths["md"]) as fh:
        fh.write(comparison_markdown(rows, metric))
    write_json(paths["json"], {"metric": metric, "methods": rows, "points": list(points)})
    plot_comparison([{"method": r["method"], **r[metric]} for r in rows], metric, paths["png"],
                          title=f"{metric} by method")
    logger.info("sweep comparison written to %s", out_dir)
    return {k: str(v) for k, v in paths.items()}
