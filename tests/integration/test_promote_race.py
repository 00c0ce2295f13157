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
