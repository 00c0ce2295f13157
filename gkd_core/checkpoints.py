"""Training checkpoints: everything an exact resume needs, written atomically, read without running code.

A checkpoint holds the trainable's state (its schedule included), the optimizer, the LR scheduler, the loader
position, the python/numpy/torch RNG states and the history, in plain types and tensors, so
:func:`load_checkpoint` reads it with ``weights_only=True`` (:func:`gkd_core.io.safe_torch_load`). A checkpoint
carries its run's fingerprint; one from another run configuration is ignored (the run starts fresh).

Several processes: rank 0 writes it and reads it back (the engine broadcasts it). Its state is that of the
whole run, not of a rank: the epoch plan is global and sharded afresh, the trainable's weights and optimizer
state are the same on every rank, the RNG states are rank 0's (nothing in a training step draws from the
global generators), so a run can resume with another number of processes (docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from gkd_core.io import UnsafeFileError, safe_torch_load, torch_save

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "Checkpointing", "save_checkpoint", "load_checkpoint",
           "restore_checkpoint", "HOLD_ENV", "hold_after_checkpoint", "hold_until_removed"]

CHECKPOINT_FORMAT = "gkd-checkpoint/2"
# Fault-injection hook for tests: "<epoch>:<file>" makes the run that writes the checkpoint of <epoch> create
# <file> and wait (at most HOLD_MAX_S) until <file> is removed, so a test can kill it at a known point instead
# of racing the clock. Unset, nothing happens.
HOLD_ENV = "GKD_TEST_HOLD_AFTER_EPOCH"
HOLD_MAX_S = 600.0


class CheckpointError(ValueError):
    """A resume checkpoint that cannot be used safely (unreadable, or carrying more than plain data)."""


@dataclass
class Checkpointing:
    """Where :func:`fit` writes its per-epoch checkpoint, and whether a matching one is resumed.
    ``fingerprint`` identifies the run (:func:`gkd_core.engine.config_fingerprint`): another run's checkpoint is never resumed."""

    path: Path
    fingerprint: str = ""
    resume: bool = True
    on_save: Optional[Callable[[Path], None]] = None  # told after each checkpoint is written (e.g. to mirror it)


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in plain types and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, fingerprint: str, epoch: int, trainable: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any,
                    history: list[dict[str, float]], best: Optional[Mapping[str, Any]] = None,
                    world_size: int = 1, plateau: Optional[Mapping[str, Any]] = None) -> None:
    """Write the full training state after ``epoch`` epochs, atomically (``best``: the best validation
    epoch so far, its accuracy and the student's weights then; ``world_size``: the processes that trained it,
    recorded when more than one, for the log of a resume; ``plateau``: the lr_schedule plateau watcher's state)."""
    state = {
        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
        "trainable": trainable.training_state(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": loader.state_dict() if hasattr(loader, "state_dict") else {},
        "rng": _rng_state(), "history": history, "best": dict(best or {}),
    }
    if world_size > 1:
        state["world_size"] = int(world_size)
    if plateau is not None:
        state["plateau"] = dict(plateau)
    torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, fingerprint: str) -> Optional[dict[str, Any]]:
    """The checkpoint at ``path`` if it exists and belongs to the run ``fingerprint``; else None (a foreign
    or outdated one is logged and ignored: the run starts fresh and overwrites it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = safe_torch_load(path)
    except UnsafeFileError as err:
        raise CheckpointError(f"{err}; delete it to start this run fresh") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        logger.warning("checkpoint %s belongs to another run configuration; starting fresh", path)
        return None
    return state


def restore_checkpoint(state: Mapping[str, Any], trainable: Any, optimizer: torch.optim.Optimizer,
                       scheduler: Any, loader: Any) -> tuple[int, list[dict[str, float]]]:
    """Put a checkpoint's state back; returns ``(epochs done, history)``."""
    trainable.load_training_state(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if hasattr(loader, "load_state_dict"):
        loader.load_state_dict(state["loader"])
    _set_rng_state(state["rng"])
    return int(state["epoch"]), list(state["history"])


def hold_after_checkpoint(epoch: int) -> None:
    """Honour :data:`HOLD_ENV` after the checkpoint of ``epoch`` (1-based) was written (see there)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if not marker or not at.strip().isdigit():
        raise ValueError(f"{HOLD_ENV}={spec!r}: expected <epoch>:<file>")
    if int(at) != epoch:
        return
    hold_until_removed(Path(marker), f"after the epoch {epoch} checkpoint ({HOLD_ENV})")


def hold_until_removed(path: Path, where: str) -> None:
    """Fault-injection for tests: create ``path`` and wait (at most HOLD_MAX_S) until it is removed."""
    path.write_text(f"{os.getpid()}\n")
    logger.info("holding %s until %s is removed", where, path)
    deadline = time.monotonic() + HOLD_MAX_S
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
