"""Two promotions at once against one registry, each a real `python -m flows.promote --flow` process talking to
a real `prefect server start`: the first holds between its decision and its alias move (a test hold, so the
race is certain, not timed), the second starts meanwhile. With the one promotion slot (a Prefect global
concurrency limit) the second waits, then compares with the first's result: the registry ends as after one
then the other. Without the slot the second would read the old champion and the first would then put a worse
model back."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from _project import edit_params
from _servers import PrefectServer, start_process, wait_for
from test_promote import NAME, _aliases, _register

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_promotions_at_once_end_as_one_after_the_other(clone_project, live_prefect: PrefectServer,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import tracking
    from tasks.paths import StagePaths
    from tasks.promote import HOLD_ENV, promote

    root = clone_project()
    store = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    edit_params(root, {"promote.max_below_teacher": None})
    versions = tmp_path / "versions"
    versions.mkdir()
    old = _register(root, versions, 0.80)
    assert promote(StagePaths(root), version=old)["decision"] == "promoted"
    worse, better = _register(root, versions, 0.85), _register(root, versions, 0.90)

    hold = tmp_path / "hold"
    env = live_prefect.client_env({"MLFLOW_TRACKING_URI": store})
    cmd = [sys.executable, "-m", "flows.promote", "--flow", "--project-dir", str(root), "--model-version"]
    first = start_process("promote worse", [*cmd, worse], tmp_path / "first.log", {**env, HOLD_ENV: str(hold)})
    second = None
    try:
        wait_for(hold.exists, 300, "the first promotion to hold before its alias move",
                 on_timeout=lambda: first.output())
        second = start_process("promote better", [*cmd, better], tmp_path / "second.log", env)
        wait_for(lambda: "waiting for the promotion slot" in second.output() or not second.alive(), 300,
                 "the second promotion to ask for the slot", on_timeout=lambda: second.output())
        deadline = time.monotonic() + 15  # time enough to finish, had it not waited for the slot
        while second.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert second.alive(), f"the second promotion did not wait for the first:\n{second.output()}"
        hold.unlink()
        for proc in (first, second):
            wait_for(lambda: not proc.alive(), 300, f"{proc.name} to finish", on_timeout=lambda: proc.output())
            assert proc.popen.returncode == 0, proc.output()
    finally:
        hold.unlink(missing_ok=True)
        for proc in (first, second):
            if proc is not None:
                proc.stop()

    client = tracking.get_client(root)
    assert _aliases(root)["champion"] == better
    tags = {v: client.get_model_version(NAME, v).tags for v in (worse, better)}
    assert tags[worse]["promote.decision"] == "promoted" and tags[worse]["promote.compared_with"] == old
    assert tags[better]["promote.decision"] == "promoted" and tags[better]["promote.compared_with"] == worse
    assert tags[worse]["replaced_by"] == better
    assert json.loads((root / "reports/promote.json").read_text())["champion_after"] == better


def test_two_pipelines_at_once_against_one_registry(clone_project, live_prefect: PrefectServer,
                                                    tmp_path: Path) -> None:
    """Two `python -m flows.pipeline --promote` processes, two checkouts, one `mlflow server`, one Prefect server:
    the first holds inside its promotion until the second asks for the slot (or is done). Each registers its own
    student and promotes that version; the champion is the better of the two, as after one then the other."""
    from mlflow import MlflowClient

    from _servers import mlflow_server
    from tasks.promote import HOLD_ENV

    first_root, second_root = clone_project(), clone_project()
    for root, epochs in ((first_root, 1), (second_root, 2)):  # two different students of the same data
        edit_params(root, {"student.train.epochs": epochs, "promote.max_below_teacher": None})
    hold = tmp_path / "hold"
    with mlflow_server(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "artifacts", tmp_path) as tracking:
        env = live_prefect.client_env({"MLFLOW_TRACKING_URI": tracking})
        cmd = [sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", "--promote"]
        first = start_process("first pipeline", cmd, tmp_path / "first.log", {**env, HOLD_ENV: str(hold)},
                              cwd=first_root)
        second = start_process("second pipeline", cmd, tmp_path / "second.log", env, cwd=second_root)
        try:
            wait_for(lambda: hold.exists() or not first.alive(), 900, "the first pipeline to reach its promotion",
                     on_timeout=first.output)
            assert hold.exists(), first.output()
            wait_for(lambda: "waiting for the promotion slot" in second.output(20000) or not second.alive(), 900,
                     "the second pipeline to reach its promotion", on_timeout=second.output)
            hold.unlink()
            for proc in (first, second):
                wait_for(lambda: not proc.alive(), 600, f"{proc.name} to finish", on_timeout=proc.output)
                assert proc.popen.returncode == 0, proc.output()
        finally:
            hold.unlink(missing_ok=True)
            first.stop()
            second.stop()
        client = MlflowClient(tracking)
        versions = client.search_model_versions(f"name='{NAME}'")
        assert len(versions) == 2
        accuracy = {v.version: client.get_run(v.run_id).data.metrics["test_accuracy"] for v in versions}
        champion = client.get_model_version_by_alias(NAME, "champion").version
    assert accuracy[champion] == max(accuracy.values()), (champion, accuracy)
    records = [json.loads((root / "reports/promote.json").read_text()) for root in (first_root, second_root)]
    assert {r["challenger"]["version"] for r in records} == set(accuracy)  # each promoted its own version
    # one after the other: the one that promoted first saw no champion, the other compared with its result
    earlier = [r for r in records if r["champion_before"] is None]
    assert len(earlier) == 1, records
    later = next(r for r in records if r is not earlier[0])
    if earlier[0]["decision"] == "promoted":
        assert later["champion_before"]["version"] == earlier[0]["challenger"]["version"]
