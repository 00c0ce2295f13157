"""What every dataset reader shares: the error it raises, the arrays it returns, and the seeded splits.

Splits:
- The *test* split never depends on ``params.seed``: it is the dataset's official test set, or (digits, an
  image folder without ``test/``) a stratified 20 % held out with the fixed seed :data:`TEST_SPLIT_SEED`.
- The *validation* split is a stratified ``val_fraction`` of the training set, drawn with ``seed``
  (:func:`gkd_core.data.prepared.prepare_dataset`).
- ``limit`` keeps N training images (after the validation split), drawn with ``seed``; validation and test
  splits are untouched so scores stay comparable.

The val split, ``limit`` and the loaders' epoch plans draw from separate ``SeedSequence`` streams
(:func:`_rng`, :data:`_EPOCH_STREAM`), so none of them moves when another changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from gkd_core.sections import DatasetConfig

TEST_SPLIT_SEED = 20_170_828  # fixed: the test split never moves with params.seed
TEST_FRACTION = 0.2  # held out as test where a dataset has no official test split
_VAL_STREAM = 1  # SeedSequence stream ids, so the val split and `limit` draw independent numbers
_LIMIT_STREAM = 2
_EPOCH_STREAM = 3


class DatasetError(RuntimeError):
    """A dataset source is missing, has the wrong layout or is corrupt; the message names the file."""


@dataclass
class RawDataset:
    """What a registry reader returns: uint8 NCHW numpy arrays and int64 labels, before the val split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str


def _root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise DatasetError(f"dataset.root is required for dataset {cfg.name!r}")
    return Path(cfg.root).expanduser()


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def stratified_split(
    labels: Any, fraction: float, seed: Union[int, np.random.Generator]
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)``, both sorted; ``len(held_out) == round(n * fraction)``.

    Each class contributes in proportion to its size (largest-remainder rounding, so the total is exact);
    within a class the held-out members are drawn with ``np.random.default_rng(seed)``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_held = int(math.floor(n * fraction + 0.5))
    if n_held <= 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_held * counts / n
    take = np.floor(exact).astype(np.int64)
    remainder = n_held - int(take.sum())
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx
