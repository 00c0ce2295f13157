"""One writer per project folder (tasks/project_lock.py): a second run is refused with its holder named; the
holder's own child processes share the lock; a killed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gkd_core.cli_support import UserError
from tasks.project_lock import HOLDER_FILE, one_writer

HOLD = ("import pathlib, sys, time\nfrom tasks.project_lock import one_writer\n"
        "with one_writer(sys.argv[1], 'the other run'):\n"
        "    m = pathlib.Path(sys.argv[2]); m.write_text('x')\n"
        "    while m.exists(): time.sleep(0.05)\n")
USE = "import sys\nfrom tasks.project_lock import one_writer\nwith one_writer(sys.argv[1], 'child'): print('in')\n"


def _holder(folder: Path, marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(marker)])
    for _ in range(600):
        if marker.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert marker.exists(), "the holder did not take the lock"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = _holder(tmp_path / "project", marker)
    try:
        with pytest.raises(UserError, match=rf"project is being written by another run \(the other run, pid "
                                            rf"{proc.pid} on .*, since .*\): one writer per project folder"):
            with one_writer(tmp_path / "project", "me"):
                pass
    finally:
        marker.unlink()
        proc.wait(timeout=60)
    with one_writer(tmp_path / "project", "me"):  # released
        assert (tmp_path / "project" / HOLDER_FILE).is_file()
    assert not (tmp_path / "project" / HOLDER_FILE).exists()


def test_the_holders_own_processes_share_its_lock(tmp_path: Path) -> None:
    with one_writer(tmp_path, "a flow"):
        with one_writer(tmp_path, "the same process again"):
            pass
        child = subprocess.run([sys.executable, "-c", USE, str(tmp_path)], capture_output=True, text=True)
        assert child.returncode == 0 and child.stdout.strip() == "in", child.stderr
    # outside the block, a process that does not descend from a holder takes it on its own
    alone = subprocess.run([sys.executable, "-c", USE, str(tmp_path)], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "GKD_WRITER_HOLDS"})
    assert alone.returncode == 0, alone.stderr


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = _holder(tmp_path / "project", marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    with one_writer(tmp_path / "project", "the next run"):
        pass
