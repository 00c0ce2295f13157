"""What travels between the machines of a pipeline run: a CPU box that orchestrates and GPU boxes that train.

* **Code**: the git commit the CPU box runs (a full commit id, nothing else). Each flow run on a GPU worker
  works in a checkout of its own (:func:`run_checkout`): a ``git clone --shared`` of the worker's checkout
  (``$GKD_PROJECT_DIR``, which fetches the commit when it lacks it) at that commit, under ``$GKD_RUNS_DIR``,
  sharing the worker checkout's DVC cache, removed when the run ends. So several workers on one box never
  race on one checkout, one dvc.lock or one DVC repo lock, and the checkout a person works in keeps its HEAD
  and its edits. Uncommitted code on the CPU box cannot travel, so dispatching it is refused.
* **Configuration**: params.yaml and dvc.lock as text (uncommitted parameter edits travel too).
* **Data and models**: the DVC remote (``dvc push`` / ``dvc pull`` of the stages' outputs).
* **The result**: the stage's new dvc.lock entry, handed back through a Prefect artifact (stored by the
  Prefect server both boxes talk to) and merged into the CPU box's dvc.lock.
* **Resume state**: every epoch's checkpoint is mirrored to ``<DVC remote>/gkd-checkpoints/<project>/<run>/``
  (fsspec; :class:`CheckpointMirror`), so a rerun on any GPU box resumes from the last epoch the remote holds
  after a worker died.
* **Sweeps** (not DVC-tracked): a sweep's shared files and each point's reports travel through
  ``<DVC remote>/gkd-sweeps/<name>/`` (:class:`Exchange`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import fsspec
import yaml
from filelock import FileLock

from gkd_core.cli_support import UserError
from gkd_core.io import atomic_write
from tasks.tracking import tracking_uri

logger = logging.getLogger(__name__)

PROJECT_DIR_ENV = "GKD_PROJECT_DIR"  # a worker's checkout of the project
RUNS_ENV = "GKD_RUNS_DIR"  # where a worker makes each flow run's own checkout (default: <tmp>/gkd-runs-<uid>)
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
MIRROR_ENV = "GKD_CHECKPOINT_MIRROR"  # where training stages mirror their checkpoints (a URL or folder)
TRAVELLING = ("params.yaml", "dvc.lock")  # files that travel as text, so they may differ from the commit


def project_dir(given: Optional[str]) -> Path:
    """The project folder of this process: ``given``, else ``$GKD_PROJECT_DIR`` (a worker's checkout), else
    the current directory (a process worker runs flows in a temporary one: set the variable there)."""
    return Path(given or os.environ.get(PROJECT_DIR_ENV) or ".").resolve()


def _git(root: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise UserError(f"{root}: git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return proc.stdout.strip()


def pinned_commit(root: Path) -> str:
    """The commit a GPU box must run; refused while tracked code differs from it (it could not travel)."""
    commit = _git(root, "rev-parse", "HEAD")
    changed = _git(root, "diff", "--name-only", "HEAD").splitlines()  # tracked files, staged or not
    code = [p for p in changed if p not in TRAVELLING]
    if code:
        raise UserError(f"{root}: uncommitted changes to {', '.join(code[:5])}: a GPU worker runs commit "
                        f"{commit[:12]}, so commit (and push) them first")
    return commit


def check_commit(commit: object, field: str = "git_commit") -> str:
    """``commit`` when it is a full commit id; a branch, tag, abbreviation or anything else is refused (it
    could move, or be read by git as an option)."""
    if not isinstance(commit, str) or not COMMIT_RE.fullmatch(commit):
        raise UserError(f"{field}={str(commit)[:60]!r}: expected a full commit id (40 lowercase hex digits)")
    return commit


def _has_commit(root: Path, commit: str) -> bool:
    return _git(root, "cat-file", "-t", "--end-of-options", commit, check=False) == "commit"


def _ensure_commit(base: Path, commit: str) -> None:
    """Fetch ``commit`` into the worker's checkout when it lacks it (one fetch at a time per checkout)."""
    if _has_commit(base, commit):
        return
    git_dir = Path(_git(base, "rev-parse", "--absolute-git-dir"))
    with FileLock(str(git_dir / "gkd-fetch.lock"), timeout=600):
        if not _has_commit(base, commit):
            _git(base, "fetch", "--all", "--quiet")
    if not _has_commit(base, commit):
        raise UserError(f"{base}: commit {commit[:12]} is not reachable from this checkout's git remotes "
                        "(push it where the GPU boxes fetch from)")


def runs_dir() -> Path:
    """Where this worker makes the flow runs' own checkouts (``$GKD_RUNS_DIR``)."""
    given = os.environ.get(RUNS_ENV, "").strip()
    return Path(given) if given else Path(tempfile.gettempdir()) / f"gkd-runs-{os.getuid()}"


def _share_dvc_cache(base: Path, dest: Path) -> None:
    """Point ``dest``'s DVC cache at ``base``'s (group-shared, so workers under other uids can use it too), and
    give it ``base``'s local DVC config (a remote added with ``--local`` lives there)."""
    from tasks.dvc_ops import open_repo

    local = base / ".dvc" / "config.local"
    if local.is_file():
        shutil.copyfile(local, dest / ".dvc" / "config.local")
    with open_repo(base) as repo:
        cache_dir = repo.cache.local_cache_dir
    with open_repo(dest) as repo, repo.config.edit("local") as conf:
        conf["cache"]["dir"] = cache_dir
        conf["cache"]["shared"] = "group"


@contextlib.contextmanager
def run_checkout(base: Path, commit: str, name: str) -> Iterator[Path]:
    """A checkout for one flow run: ``base`` (the worker's checkout) cloned at ``commit`` into a new folder of
    :func:`runs_dir`, sharing ``base``'s DVC cache and, when no ``MLFLOW_TRACKING_URI`` is set, its tracking
    store; removed when the run ends, whatever its outcome (resume state lives in the checkpoint mirror).
    In ``base`` only its DVC cache and (for a commit it lacks) its git objects change."""
    check_commit(commit)
    if not (base / ".git").exists():
        raise UserError(f"{base}: the worker's checkout ({PROJECT_DIR_ENV}) is not a git checkout of the project")
    _ensure_commit(base, commit)
    parent = runs_dir()
    parent.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    try:
        _git(parent, "clone", "--quiet", "--shared", "--no-checkout", "--", str(base), str(dest))
        _git(dest, "checkout", "--quiet", "--detach", commit, "--")
        _share_dvc_cache(base, dest)
        logger.debug("run checkout %s at commit %s (from %s)", dest, commit[:12], base)
        with env_var("MLFLOW_TRACKING_URI", None if os.environ.get("MLFLOW_TRACKING_URI") else tracking_uri(base)):
            yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@contextlib.contextmanager
def env_var(name: str, value: Optional[str]) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (nothing changes when ``value`` is None)."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def read_text(root: Path, name: str) -> Optional[str]:
    path = root / name
    return path.read_text() if path.is_file() else None


def write_text(root: Path, name: str, text: Optional[str]) -> None:
    if text is not None:
        with atomic_write(root / name) as fh:
            fh.write(text)


def lock_entry(root: Path, stage: str) -> Optional[dict[str, Any]]:
    """``stage``'s entry of ``root``'s dvc.lock (None when it has none)."""
    text = read_text(root, "dvc.lock")
    return ((yaml.safe_load(text) or {}).get("stages") or {}).get(stage) if text else None


def merge_lock_entry(root: Path, stage: str, entry: dict[str, Any]) -> None:
    """Put ``entry`` in ``root``'s dvc.lock for ``stage`` (the other stages' entries are kept), holding DVC's
    repository lock as DVC itself does when it writes the file (a `dvc` command running meanwhile waits or
    fails; it never interleaves)."""
    from tasks.dvc_ops import open_repo  # DVC is slow to import; only the hand-off needs it here

    with open_repo(root) as repo, repo.lock:
        text = read_text(root, "dvc.lock")
        lock = (yaml.safe_load(text) if text else None) or {"schema": "2.0", "stages": {}}
        lock.setdefault("stages", {})[stage] = entry
        write_text(root, "dvc.lock", yaml.safe_dump(lock, sort_keys=False))


def remote_url(root: Path) -> Optional[str]:
    """The URL (or folder) of the DVC remote the project pushes to by default."""
    from tasks.dvc_ops import open_repo  # DVC is slow to import; only the hand-off needs its config here

    with open_repo(root) as repo:
        name = repo.config.get("core", {}).get("remote")
        remotes = repo.config.get("remote", {})
        if not name and len(remotes) == 1:
            name = next(iter(remotes))
        return remotes.get(name, {}).get("url") if name else None


class Exchange:
    """A folder at ``url`` (fsspec) that mirrors files of a local folder, by relative path."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def put(self, local_root: Path, rels: list[str]) -> None:
        for rel in rels:
            fs, path = fsspec.core.url_to_fs(f"{self.url}/{rel}")
            fs.makedirs(fs._parent(path), exist_ok=True)
            fs.put_file(str(local_root / rel), f"{path}.partial")
            fs.mv(f"{path}.partial", path)

    def get(self, local_root: Path, rels: list[str]) -> None:
        for rel in rels:
            fs, path = fsspec.core.url_to_fs(f"{self.url}/{rel}")
            if not fs.exists(path):
                raise UserError(f"{self.url}/{rel}: missing in the exchange (was the sweep's data pushed?)")
            with fs.open(path, "rb") as src, atomic_write(local_root / rel, "wb") as dst:
                dst.write(src.read())


def project_id(root: Path) -> str:
    """What names a project on a shared store: its git history's root commit (12 hex digits), the same in
    every clone and run checkout of it; a folder outside git is named by its absolute path's hash."""
    roots = _git(root, "rev-list", "--max-parents=0", "HEAD", check=False).split()
    if roots:
        return sorted(roots)[0][:12]
    return "path-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


class CheckpointMirror:
    """A copy of a training stage's checkpoint kept at ``url`` (any fsspec URL or folder)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @classmethod
    def from_env(cls, root: Path, run_config: str) -> Optional["CheckpointMirror"]:
        """The mirror under ``$GKD_CHECKPOINT_MIRROR``, keyed ``<project>/<run>/``: the project (:func:`project_id`)
        and the run's configuration (``run_config``, hashed), so projects sharing one DVC remote, and runs of
        other settings, neither overwrite nor delete each other's checkpoints, while a rerun of the same run on
        any machine finds its own."""
        url = os.environ.get(MIRROR_ENV, "").strip()
        if not url:
            return None
        run = hashlib.sha256(run_config.encode()).hexdigest()[:16]
        return cls(f"{url.rstrip('/')}/{project_id(root)}/{run}")

    def _target(self, local: Path) -> str:
        return f"{self.url}/{local.name}"

    def fetch(self, local: Path) -> bool:
        """Copy the mirrored checkpoint to ``local`` when ``local`` is missing; True when one was fetched."""
        if local.exists():
            return False
        fs, path = fsspec.core.url_to_fs(self._target(local))
        if not fs.exists(path):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        with fs.open(path, "rb") as src, atomic_write(local, "wb") as dst:
            dst.write(src.read())
        logger.info("resume checkpoint %s fetched from %s", local.name, self.url)
        return True

    def push(self, local: Path) -> None:
        fs, path = fsspec.core.url_to_fs(self._target(local))
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.partial"
        fs.put_file(str(local), tmp)
        fs.mv(tmp, path)

    def remove(self, local: Path) -> None:
        fs, path = fsspec.core.url_to_fs(self._target(local))
        if fs.exists(path):
            fs.rm(path)
