"""gkd_core.plots: every PNG the project draws, written atomically, without touching matplotlib's global state."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gkd_core.plots import plot_comparison, plot_confusion_matrix, plot_learning_curves, plot_schedules
from gkd_core.schedules import SCHEDULES, build_schedule

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_schedules_writes_png(tmp_path):
    out = tmp_path / "w.png"
    plot_schedules([build_schedule(n) for n in SCHEDULES], str(out))
    assert out.read_bytes()[:8] == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_confusion_matrix_writes_png(tmp_path) -> None:
    cm = torch.tensor([[5, 1], [0, 4]])
    out = tmp_path / "plots" / "cm.png"
    plot_confusion_matrix(cm, ["cat", "dog"], out)
    assert out.read_bytes()[:8] == PNG
    assert [p.name for p in out.parent.iterdir()] == ["cm.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("weight", [0.0, 0.5], ids=["teacher", "student"])
def test_plot_learning_curves_writes_png(tmp_path, weight: float) -> None:
    history = [{"epoch": e, "train_accuracy": 0.5 + 0.1 * e, "val_accuracy": float("nan") if e == 1 else 0.6,
                "train_total": 1.0 / e, "train_ce": 0.8 / e, "weight": weight * e} for e in (1, 2, 3)]
    out = tmp_path / "curves.png"
    plot_learning_curves(history, out, "title")
    assert out.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_plot_comparison_writes_png(tmp_path) -> None:
    rows = [{"method": "none", "mean": 0.9, "std": 0.01, "values": [0.89, 0.91]},
            {"method": "kd", "mean": None, "std": None, "values": []}]
    out = tmp_path / "comparison.png"
    plot_comparison(rows, "test_accuracy", out, "test_accuracy by method")
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == PNG


def test_no_pyplot_and_no_backend_switch() -> None:
    """Drawing leaves matplotlib's global state alone: pyplot is never imported, the backend never chosen."""
    code = ("import matplotlib, os, sys, tempfile\n"
            "def refuse(*args, **kwargs): raise AssertionError('matplotlib.use called')\n"
            "matplotlib.use = refuse\n"
            "import gkd_core.plots as p\n"
            "from gkd_core.schedules import build_schedule\n"
            "out = tempfile.mkdtemp()\n"
            "p.plot_schedules([build_schedule('gompertz')], os.path.join(out, 's.png'))\n"
            "p.plot_confusion_matrix([[1, 0], [0, 1]], ['a', 'b'], os.path.join(out, 'c.png'))\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
