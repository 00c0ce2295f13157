"""The fault-injection hold point (gkd_core.checkpoints.HOLD_ENV): off unless set, only at its epoch, released
by removing its file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gkd_core.checkpoints import HOLD_ENV, hold_after_checkpoint


def test_unset_and_other_epochs_do_not_hold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(HOLD_ENV, raising=False)
    hold_after_checkpoint(1)
    monkeypatch.setenv(HOLD_ENV, f"3:{tmp_path / 'held'}")
    hold_after_checkpoint(2)
    assert not (tmp_path / "held").exists()


def test_the_named_epoch_holds_until_its_file_is_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "held"
    monkeypatch.setenv(HOLD_ENV, f"2:{marker}")
    released = threading.Event()

    def release() -> None:
        while not marker.exists():
            time.sleep(0.01)
        released.set()
        marker.unlink()

    threading.Thread(target=release, daemon=True).start()
    hold_after_checkpoint(2)
    assert released.is_set() and not marker.exists()


def test_a_malformed_spec_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOLD_ENV, "two")
    with pytest.raises(ValueError, match=f"{HOLD_ENV}='two': expected <epoch>:<file>"):
        hold_after_checkpoint(2)
