"""What travels to a GPU box: the pinned commit (tracked code must be committed; params.yaml and dvc.lock
travel as text) and the dvc.lock entry a stage hands back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from gkd_core.cli_support import UserError
from tasks import handoff


def _repo(tmp_path: Path) -> Path:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("params.yaml", "dvc.lock", "model.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return tmp_path


def test_params_and_lock_edits_travel_but_code_edits_are_refused_by_name(tmp_path: Path) -> None:
    root = _repo(tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    (root / "params.yaml").write_text("student: {}\n")
    (root / "dvc.lock").write_text("schema: '2.0'\n")
    (root / "untracked.txt").write_text("ignored\n")
    assert handoff.pinned_commit(root) == head
    (root / "model.py").write_text("changed = True\n")
    with pytest.raises(UserError, match=r"uncommitted changes to model\.py: a GPU worker runs commit"):
        handoff.pinned_commit(root)
    subprocess.run(["git", "add", "model.py"], cwd=root, check=True)  # staged is still not committed
    with pytest.raises(UserError, match=r"changes to model\.py:"):
        handoff.pinned_commit(root)


def test_a_handed_back_lock_entry_replaces_only_its_stage(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"prepare_data": {"cmd": "a"}, "train_teacher": {"cmd": "old"}}}))
    handoff.merge_lock_entry(tmp_path, "train_teacher", {"cmd": "new"})
    assert handoff.lock_entry(tmp_path, "train_teacher") == {"cmd": "new"}
    assert handoff.lock_entry(tmp_path, "prepare_data") == {"cmd": "a"}
    handoff.merge_lock_entry(tmp_path, "distill_student", {"cmd": "d"})
    assert set(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]) == {
        "prepare_data", "train_teacher", "distill_student"}
