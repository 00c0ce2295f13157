"""gkd_core.io: atomic writes, and torch files whose bytes depend only on their content."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch

from gkd_core.io import atomic_write, torch_save


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_torch_save_same_content_same_bytes(tmp_path: Path) -> None:
    obj = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "meta": {"classes": ["a", "b"]}}
    torch_save(obj, tmp_path / "a.pt")
    torch_save(obj, tmp_path / "a.pt")  # overwritten through a fresh temp file
    torch_save({k: v for k, v in obj.items()}, tmp_path / "b.pt")  # another name, same content
    first = (tmp_path / "a.pt").read_bytes()
    torch_save(obj, tmp_path / "a.pt")
    assert (tmp_path / "a.pt").read_bytes() == first  # DVC sees an unchanged output after a forced rerun
    assert _md5(tmp_path / "b.pt") == _md5(tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], obj["w"]) and loaded["meta"] == obj["meta"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temp files left


def test_atomic_write_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_open_would_give(tmp_path: Path, umask: int) -> None:
    """mkstemp creates 0600; a finished output gets 0o666 & ~umask like any file (0644 under umask 022)."""
    from gkd_core.io import atomic_path, current_umask, write_json

    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        write_json(tmp_path / "r.json", {"a": 1})
        with atomic_write(tmp_path / "t.txt") as fh:
            fh.write("x")
        torch_save({"w": torch.zeros(1)}, tmp_path / "m.pt")
        with atomic_path(tmp_path / "p.bin") as tmp:
            tmp.write_bytes(b"x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for name in ("r.json", "t.txt", "m.pt", "p.bin", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, (name, oct(umask))
