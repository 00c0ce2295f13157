"""What travels to a GPU box: the pinned commit (tracked code must be committed; params.yaml and dvc.lock
travel as text) and the dvc.lock entry a stage hands back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"prepare_data": {"cmd": "a"}, "train_teacher": {"cmd": "old"}}}))
    handoff.merge_lock_entry(tmp_path, "train_teacher", {"cmd": "new"})
    assert handoff.lock_entry(tmp_path, "train_teacher") == {"cmd": "new"}
    assert handoff.lock_entry(tmp_path, "prepare_data") == {"cmd": "a"}
    handoff.merge_lock_entry(tmp_path, "distill_student", {"cmd": "d"})
    assert set(yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]) == {
        "prepare_data", "train_teacher", "distill_student"}


def _dvc_repo(root: Path, first_message: str = "one") -> Path:
    """A git + DVC checkout with two commits; HEAD is the second."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()

    root.mkdir()
    git("init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, capture_output=True)
    (root / "code.py").write_text("v = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", first_message)
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


def test_the_lock_entry_is_merged_under_dvcs_own_lock(tmp_path: Path) -> None:
    """While a `dvc` command holds the repository lock, the hand-back does not write dvc.lock behind its back."""
    from dvc.lock import LockError

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time; from dvc.repo import Repo; r = Repo(sys.argv[1]); r.lock.lock(); "
        "h = pathlib.Path(sys.argv[2]); h.write_text('x')\nwhile h.exists(): time.sleep(0.05)"),
        str(tmp_path), str(held)])
    try:
        for _ in range(600):
            if held.exists() or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert held.exists(), "the holder process did not take DVC's lock"
        with pytest.raises(LockError):
            handoff.merge_lock_entry(tmp_path, "train_teacher", {"cmd": "new"})
        assert handoff.lock_entry(tmp_path, "train_teacher") is None
    finally:
        held.unlink(missing_ok=True)
        holder.wait(timeout=60)
    handoff.merge_lock_entry(tmp_path, "train_teacher", {"cmd": "new"})  # free again
    assert handoff.lock_entry(tmp_path, "train_teacher") == {"cmd": "new"}


def test_checkpoint_mirror_keys_name_the_project_and_the_run(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Two projects on one DVC remote, or two configurations of one project, never share a checkpoint key; a
    clone of the same project (another GPU box) with the same configuration finds the same one."""
    monkeypatch.setenv(handoff.MIRROR_ENV, str(tmp_path / "remote" / "gkd-checkpoints"))
    a, b = _dvc_repo(tmp_path / "a"), _dvc_repo(tmp_path / "b", "another project")  # separate histories
    clone = tmp_path / "a-clone"
    subprocess.run(["git", "clone", "-q", str(a), str(clone)], check=True)
    ckpt = Path("checkpoints/teacher-0123456789abcdef.pt")

    def target(root: Path, config: str) -> str:
        return handoff.CheckpointMirror.from_env(root, config)._target(ckpt)

    assert target(a, "cfg") == target(clone, "cfg")
    assert target(a, "cfg") != target(b, "cfg")
    assert target(a, "cfg") != target(a, "other cfg")
    assert target(a, "cfg").startswith(str(tmp_path / "remote" / "gkd-checkpoints") + "/")
    assert target(a, "cfg").endswith("/teacher-0123456789abcdef.pt")
    monkeypatch.delenv(handoff.MIRROR_ENV)
    assert handoff.CheckpointMirror.from_env(a, "cfg") is None
