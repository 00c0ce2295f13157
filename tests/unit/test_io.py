"""gkd_core.io: atomic writes, and torch files whose bytes depend only on their content."""

from __future__ import annotations

import hashlib
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
