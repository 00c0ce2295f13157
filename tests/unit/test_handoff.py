"""What travels to a GPU box: the pinned commit (tracked code must be committed; params.yaml and dvc.lock
travel as text) and the dvc.lock entry a stage hands back."""

from __future__ import annotations

import os
import subprocess
import sys
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


def _dvc_repo(root: Path) -> Path:
    """A git + DVC checkout with two commits; HEAD is the second."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()

    root.mkdir()
    git("init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, capture_output=True)
    (root / "code.py").write_text("v = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    (root / "code.py").write_text("v = 2\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "two")
    return root


def test_a_run_gets_its_own_checkout_and_the_workers_checkout_is_untouched(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base = _dvc_repo(tmp_path / "worker")
    monkeypatch.setenv(handoff.RUNS_ENV, str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=base, capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=base, capture_output=True, text=True).stdout.strip()
    (base / "code.py").write_text("v = 'an edit in progress'\n")  # the person working here keeps it

    with handoff.run_checkout(base, first, "stage") as a, handoff.run_checkout(base, head, "stage") as b:
        assert a != b and a.parent == b.parent == tmp_path / "runs"
        assert (a / "code.py").read_text() == "v = 1\n" and (b / "code.py").read_text() == "v = 2\n"
        config = (a / ".dvc" / "config.local").read_text()
        assert str(base / ".dvc" / "cache") in config and "shared = group" in config
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{base / 'mlflow.db'}"  # the worker's store
    assert not a.exists() and not b.exists()  # removed afterwards
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert (base / "code.py").read_text() == "v = 'an edit in progress'\n"
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=base, capture_output=True, text=True).stdout.strip() == head


def test_a_run_checkout_is_removed_when_the_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _dvc_repo(tmp_path / "worker")
    monkeypatch.setenv(handoff.RUNS_ENV, str(tmp_path / "runs"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=base, capture_output=True, text=True).stdout.strip()
    with pytest.raises(RuntimeError, match="boom"):
        with handoff.run_checkout(base, head, "stage"):
            raise RuntimeError("boom")
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("commit", ["main", "HEAD", "--upload-pack=touch /tmp/x", "abc123", "A" * 40, "0" * 39,
                                    None, 7])
def test_only_a_full_commit_id_is_taken(tmp_path: Path, commit: object) -> None:
    with pytest.raises(UserError, match=r"git_commit=.*expected a full commit id \(40 lowercase hex digits\)"):
        with handoff.run_checkout(tmp_path, commit, "stage"):  # type: ignore[arg-type]
            pass


def test_an_unknown_commit_is_one_line_after_a_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _dvc_repo(tmp_path / "worker")
    monkeypatch.setenv(handoff.RUNS_ENV, str(tmp_path / "runs"))
    with pytest.raises(UserError, match="commit 0123456789ab is not reachable"):
        with handoff.run_checkout(base, "0123456789abcdef0123456789abcdef01234567", "stage"):
            pass
    assert not (tmp_path / "runs").exists()
