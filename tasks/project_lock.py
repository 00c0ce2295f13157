"""One writer per project folder: a flow, a sweep or a stage command holds the folder's lock while it writes.

A second writer is refused at once with one line naming the holder (pid, host, what, since), before any work:
two runs in one folder would pair one run's weights with the other's reports, rewrite each other's params or
retrain a teacher under the other's points. The lock is an OS file lock (``filelock``) on
``<folder>/.gkd-writer.lock``: released when its process ends, however it ends, so a killed run leaves no stale
lock. The process tree of the holder shares it: the folders it holds are listed in ``$GKD_WRITER_HOLDS``, which
its children (``dvc repro`` and the stage commands it starts, a sweep's point processes, torchrun ranks)
inherit, so a flow's own stages do not refuse their parent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from gkd_core.cli_support import UserError

LOCK_FILE = ".gkd-writer.lock"
HOLDER_FILE = ".gkd-writer.json"  # who holds it (for the refusal's message); removed on release
HOLDS_ENV = "GKD_WRITER_HOLDS"


def _held() -> list[str]:
    return [p for p in os.environ.get(HOLDS_ENV, "").split(os.pathsep) if p]


def holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, as the holder wrote it ("unknown" when it could not be read)."""
    try:
        info = json.loads((folder / HOLDER_FILE).read_text())
        return f"{info['what']}, pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


@contextlib.contextmanager
def one_writer(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder``'s writer lock for the block (or share the one an ancestor process holds); UserError when
    another run holds it."""
    folder = Path(folder).resolve()
    if str(folder) in _held():
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{folder} is being written by another run ({holder(folder)}): one writer per project "
                        "folder; wait for it to finish, or run in another checkout or sweep name") from None
    saved = os.environ.get(HOLDS_ENV)
    try:
        (folder / HOLDER_FILE).write_text(json.dumps({
            "what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
        os.environ[HOLDS_ENV] = os.pathsep.join([*_held(), str(folder)])
        yield folder
    finally:
        if saved is None:
            os.environ.pop(HOLDS_ENV, None)
        else:
            os.environ[HOLDS_ENV] = saved
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()
