"""The comparison, one command: a preset of sweeps.yaml through the real Prefect flow (points in processes of
their own), the table, MLflow, and a second run that skips what is done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _project import run

pytestmark = pytest.mark.integration


def test_preset_sweep_writes_the_table_and_resumes(clone_project, prefect_harness: None) -> None:
    from mlflow import MlflowClient
    from prefect.task_runners import ProcessPoolTaskRunner

    from flows.sweep import build_spec, sweep

    root: Path = clone_project()
    (root / "sweeps.yaml").write_text((Path(__file__).resolve().parents[2] / "sweeps.yaml").read_text())
    spec = build_spec(root, "digits-smoke", None, None, ["student.train.epochs=2"], None, None)
    first = sweep.with_options(task_runner=ProcessPoolTaskRunner(max_workers=2))(spec, str(root), 1,
                                                                                publish="digits-smoke")
    folder = root / "reports/sweep/digits-smoke"
    table = json.loads((folder / "comparison.json").read_text())
    rows = {r["arm"]: r for r in table["arms"]}
    assert set(rows) == {"none", "kd", "gompertz"} and all(r["n"] == 2 for r in rows.values())
    for r in rows.values():
        assert r["test_accuracy"]["mean"] > 0.3 and len(r["test_accuracy"]["values"]) == 2
        assert r["best_val_test_accuracy"]["mean"] > 0.3
    assert "vs_reference" not in rows["kd"] and rows["gompertz"]["vs_reference"]["test_accuracy"]["n"] == 2
    assert rows["kd"]["objective"].startswith("CE + constant(a=1) * [1 KD]")
    md = (folder / "comparison.md").read_text()
    assert "| `gompertz` (primary) | 2 |" in md and "Δ final vs `kd`" in md and "Hardware:" in md
    assert (folder / "comparison.png").stat().st_size > 1000
    assert (folder / "params.yaml").is_file() and (folder / "models/teacher.pt").is_file()
    assert len({p["dir"] for p in first["points"]}) == 6 and not any(p["skipped"] for p in first["points"])
    assert [(c["a"], c["b"], c["label"]) for c in table["contrasts"]] == [("gompertz", "kd", "primary"),
                                                                           ("kd", "none", "exploratory")]

    # the committed copy: the same comparison, and a small summary per point (curves, loss terms, fingerprint)
    public = root / "docs/results/digits-smoke"
    assert (public / "comparison.md").read_text() == md and (public / "comparison.png").is_file()
    summaries = {f.stem: json.loads(f.read_text()) for f in (public / "points").glob("*.json")}
    assert set(summaries) == {f"{a}-seed{s}" for a in ("none", "kd", "gompertz") for s in (0, 1)}
    kd0 = summaries["kd-seed0"]
    assert len(kd0["val_curve"]) == 2 and all(0 < v <= 1 for v in kd0["val_curve"])
    assert len(kd0["terms"]["kd"]) == 2 and kd0["terms"]["weight"] == [1.0, 1.0] and "wasserstein" not in kd0["terms"]
    assert set(summaries["gompertz-seed0"]["terms"]) == {"ce", "kd", "wasserstein", "grad_match", "weight"}
    assert "kd" not in summaries["none-seed0"]["terms"] and len(kd0["fingerprint"]) == 16
    assert summaries["none-seed0"]["terms"]["weight"] == [0.0, 0.0]  # the student alone: weight 0, shown as 0
    assert kd0["test_accuracy"] == next(p for p in first["points"] if p["arm"] == "kd" and p["seed"] == 0)[
        "test_accuracy"] and "dir" not in kd0
    assert sum(f.stat().st_size for f in public.rglob("*.json")) < 100_000  # small files only

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(first["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {"none-seed0", "kd-seed1", "gompertz-seed0", "prepare_data", "train_teacher"} <= {
        r.info.run_name for r in children}

    # interrupted or repeated: finished points (and the shared teacher) are skipped, the table is the same
    again = sweep.with_options(task_runner=ProcessPoolTaskRunner(max_workers=2))(spec, str(root), 1)
    assert all(p["skipped"] for p in again["points"])
    assert json.loads((folder / "comparison.json").read_text())["arms"] == table["arms"]


def test_the_readme_form_of_the_sweep_command_runs(clone_project) -> None:
    """`--methods a b --seeds 0 1` (space-separated) and `-S` overrides, as README.md writes them."""
    root: Path = clone_project()
    proc = run([sys.executable, "-m", "flows.sweep", "--methods", "none", "kd", "--seeds", "0", "--workers", "1",
                "-S", "student.train.epochs=1", "--name", "readme"], root, timeout=900)
    assert "Sweep readme" in proc.stdout and "kd: CE + constant(a=1) * [1 KD]" in proc.stdout, proc.stdout[-2000:]
    assert "| `kd` | 1 |" in (root / "reports/sweep/readme/comparison.md").read_text()
    assert "student[kd] epoch 1/1" in proc.stderr, "a point's epoch lines (in a worker process) were not shown"
    table = json.loads((root / "reports/sweep/readme/comparison.json").read_text())
    assert [r["arm"] for r in table["arms"]] == ["none", "kd"]


def test_a_second_sweep_in_the_same_folder_is_refused_while_the_first_runs(clone_project, tmp_path: Path) -> None:
    """Two `python -m flows.sweep` without --name share reports/sweep/custom: the second is refused with who holds
    the folder (before it writes anything) and the first finishes as if alone."""
    from _servers import start_process, tool_env, wait_for

    root: Path = clone_project()
    hold = tmp_path / "hold"
    cmd = [sys.executable, "-m", "flows.sweep", "--methods", "none", "--seeds", "0", "--workers", "1",
           "-S", "teacher.train.epochs=2", "-S", "student.train.epochs=1"]
    first = start_process("first sweep", cmd, tmp_path / "first.log",
                          tool_env({"GKD_TEST_HOLD_AFTER_EPOCH": f"2:{hold}"}), cwd=root)
    try:
        wait_for(hold.exists, 600, "the first sweep to hold in its teacher's training", on_timeout=first.output)
        params_before = (root / "reports/sweep/custom/params.yaml").read_text()
        second = run([*cmd[:4], "kd", *cmd[5:]], root, check=False, timeout=600, env={"COLUMNS": "500"})
        assert second.returncode == 2, second.stderr[-2000:]
        assert "reports/sweep/custom is being written by another run (sweep custom flow run" in second.stderr
        assert f"pid {first.popen.pid}" in second.stderr
        assert (root / "reports/sweep/custom/params.yaml").read_text() == params_before  # untouched
        hold.unlink()
        wait_for(lambda: not first.alive(), 600, "the first sweep to finish", on_timeout=first.output)
        assert first.popen.returncode == 0, first.output()
    finally:
        hold.unlink(missing_ok=True)
        first.stop()
    table = json.loads((root / "reports/sweep/custom/comparison.json").read_text())
    assert [r["arm"] for r in table["arms"]] == ["none"]
    assert not (root / "reports/sweep/custom/.gkd-writer.json").exists()  # released


def test_the_teacher_cache_is_computed_once_per_sweep(clone_project, prefect_harness: None,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """With runtime.cache_teacher the sweep computes the teacher's outputs once (data/teacher_cache.pt) and
    every point reads them instead of running its own cache pass."""
    import logging

    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.sweep import build_spec, sweep

    root: Path = clone_project()
    (root / "sweeps.yaml").write_text((Path(__file__).resolve().parents[2] / "sweeps.yaml").read_text())
    spec = build_spec(root, "digits-smoke", ["kd"], ["0", "1"],
                      ["student.train.epochs=1", "runtime.cache_teacher=true", "student.train.augment=false"],
                      "cached", None)
    caplog.set_level(logging.INFO, logger="gkd_core.methods.teacher_cache")
    sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))(spec, str(root), 1)  # points in-process
    cache = root / "reports/sweep/cached/data/teacher_cache.pt"
    assert cache.is_file()
    messages = [r.getMessage() for r in caplog.records if r.name == "gkd_core.methods.teacher_cache"]
    assert len([m for m in messages if " in " in m and "MB on" in m]) == 1, messages  # computed once
    assert len([m for m in messages if "read from" in m]) == 2, messages  # and read by both points
