"""Where a result comes from, as facts for MLflow tags: the git commit (and whether the tree is dirty) and the
md5 DVC recorded for an output in dvc.lock. Each answer is None when the tool cannot tell."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

import yaml


def git_commit(root: str | os.PathLike = ".") -> Optional[str]:
    """HEAD's commit hash, or None outside a git repository or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_dirty(root: str | os.PathLike = ".") -> Optional[bool]:
    """True when tracked files differ from HEAD (None when git cannot tell)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def dvc_lock_md5(root: str | os.PathLike, out_path: str) -> Optional[str]:
    """The md5 that dvc.lock records for ``out_path`` (e.g. data/prepared.pt), or None.

    Read from the lock file directly (not through the DVC API) so a stage can call it while
    ``dvc repro`` holds the repository lock.
    """
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return None
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == out_path:
                return out.get("md5")
    return None
