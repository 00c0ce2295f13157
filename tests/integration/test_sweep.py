"""The sweep flow: methods x seeds as parallel Prefect tasks (separate processes), one comparison table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_sweep_writes_a_comparison_table(clone_project, prefect_harness: None) -> None:
    from mlflow import MlflowClient
    from prefect.task_runners import ProcessPoolTaskRunner

    from flows.sweep import sweep

    root: Path = clone_project()
    (root / "mlflow.db").unlink()  # a store of the clone's own (the copied one points at the original's artifacts)
    shutil.rmtree(root / "mlartifacts")
    result = sweep.with_options(task_runner=ProcessPoolTaskRunner(max_workers=2))(
        ["none", "gompertz"], [0, 1], str(root), "test_accuracy", 1)
    assert sorted((p["method"], p["seed"]) for p in result["points"]) == [
        ("gompertz", 0), ("gompertz", 1), ("none", 0), ("none", 1)]
    table = json.loads((root / "reports/sweep/comparison.json").read_text())
    rows = {r["method"]: r for r in table["methods"]}
    assert set(rows) == {"none", "gompertz"}
    for row in rows.values():
        stat = row["test_accuracy"]
        assert row["n"] == 2 and len(stat["values"]) == 2 and stat["std"] >= 0
        assert stat["mean"] == pytest.approx(sum(stat["values"]) / 2)
        assert stat["mean"] > 0.3
    md = (root / "reports/sweep/comparison.md").read_text()
    assert "| gompertz | 2 |" in md and "±" in md
    assert (root / "reports/sweep/comparison.png").stat().st_size > 1000
    # the two seeds of one method differ (seeds are honoured), the same seed is not re-used across methods' dirs
    assert len({p["dir"] for p in result["points"]}) == 4

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert {"none-seed0", "none-seed1", "gompertz-seed0", "gompertz-seed1"} <= names
    assert {"prepare_data", "train_teacher"} <= names  # upstream through DVC: cached
    assert all(r.data.tags["cached"] == "true" for r in children if r.info.run_name in ("prepare_data", "train_teacher"))
