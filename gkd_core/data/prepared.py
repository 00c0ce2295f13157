"""The prepared dataset: uint8 splits with their statistics, cached as one ``torch.save`` file.

``prepare_dataset(cfg, seed)`` checks the source (:func:`gkd_core.data.sources.check_dataset_source`, before
any heavy work), reads the raw set, holds out a stratified validation split, applies ``limit`` and computes
per-channel statistics of the training split -> ``save_prepared`` / ``load_prepared`` (one ``torch.save`` file
of a plain dict, with a content hash) -> :func:`gkd_core.data.loaders.make_loaders`. How the splits are drawn:
:mod:`gkd_core.data.raw`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gkd_core.sections import DatasetConfig
from gkd_core.data.raw import _LIMIT_STREAM, _VAL_STREAM, DatasetError, _rng, stratified_split
from gkd_core.data.sources import DATASETS, check_dataset_source
from gkd_core.io import UnsafeFileError, safe_torch_load, torch_save

log = logging.getLogger(__name__)

PREPARED_FORMAT = "gkd-prepared-v1"
_TENSOR_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass(repr=False)
class PreparedData:
    """The prepared dataset: uint8 NCHW images and int64 labels per split, per-channel mean/std (float32,
    from the training split, on the [0, 1] scale), class names and metadata (JSON-friendly)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = None
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise DatasetError(f"PreparedData.{split}_x must be a uint8 NCHW tensor, got {_describe(x)}")
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DatasetError(
                    f"PreparedData.{split}_y must be int64 of shape ({x.shape[0]},), got {_describe(y)}"
                )
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise DatasetError(
                    f"PreparedData.{split}_x has images of shape {tuple(x.shape[1:])}, train has {shape}"
                )
            shape = tuple(x.shape[1:])
        for name in ("mean", "std"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.shape != (shape[0],):
                raise DatasetError(f"PreparedData.{name} must have shape ({shape[0]},), got {_describe(t)}")

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def image_size(self) -> int:
        """Image height (equal to the width for every built-in dataset; see :attr:`image_hw`)."""
        return int(self.train_x.shape[2])

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in _TENSOR_KEYS)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def content_hash(self) -> str:
        """sha256 over the tensors' bytes, shapes and the class names."""
        h = hashlib.sha256()
        for k in (*_TENSOR_KEYS, "mean", "std"):
            t = getattr(self, k).contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": PREPARED_FORMAT}
        for k in (*_TENSOR_KEYS, "mean", "std"):
            out[k] = getattr(self, k)
        out["classes"] = list(self.classes)
        out["meta"] = dict(self.meta)
        return out

    def __repr__(self) -> str:
        c, h, w = self.train_x.shape[1:]
        return (
            f"PreparedData({self.meta.get('name', '?')}: train={len(self.train_y)} val={len(self.val_y)} "
            f"test={len(self.test_y)}, {c}x{h}x{w}, {self.num_classes} classes)"
        )


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and (population) std of uint8 NCHW images on the [0, 1] scale (float32)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum().clamp_min(1.0)
        mean = (counts * levels).sum() / n
        var = (counts * (levels - mean) ** 2).sum() / n
        means.append(mean)
        stds.append(var.sqrt())
    mean_t = torch.stack(means).to(torch.float32)
    std_t = torch.stack(stds).to(torch.float32)
    if bool((std_t < 1e-6).any()):
        log.warning("constant channel(s) in the training images; using std 1.0 there")
        std_t = torch.where(std_t < 1e-6, torch.ones_like(std_t), std_t)
    return mean_t, std_t


def prepare_dataset(cfg: DatasetConfig, seed: int = 0) -> PreparedData:
    """Read the configured dataset, split off validation (stratified, seeded), apply ``limit``, compute stats."""
    check_dataset_source(cfg)
    t0 = time.perf_counter()
    if cfg.image_size is not None and cfg.name != "image_folder":
        log.warning("dataset.image_size is only used by image_folder; ignored for %s", cfg.name)
    raw = DATASETS[cfg.name](cfg)
    n_source = len(raw.train_y)
    tr, va = stratified_split(raw.train_y, cfg.val_fraction, _rng(seed, _VAL_STREAM))
    if cfg.limit is not None and cfg.limit < len(tr):
        keep = _rng(seed, _LIMIT_STREAM).permutation(len(tr))[: cfg.limit]
        tr = tr[np.sort(keep)]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    train_x = tensor(raw.train_x[tr])
    mean, std = channel_stats(train_x)
    data = PreparedData(
        train_x=train_x,
        train_y=tensor(raw.train_y[tr]),
        val_x=tensor(raw.train_x[va]),
        val_y=tensor(raw.train_y[va]),
        test_x=tensor(np.array(raw.test_x, copy=True)),
        test_y=tensor(np.array(raw.test_y, dtype=np.int64, copy=True)),
        mean=mean,
        std=std,
        classes=list(raw.classes),
    )
    data.meta = {
        "format": PREPARED_FORMAT,
        "name": cfg.name,
        "source": raw.source,
        "seed": int(seed),
        "val_fraction": float(cfg.val_fraction),
        "limit": cfg.limit,
        "image_size": cfg.image_size,
        "shape": list(data.train_x.shape[1:]),
        "num_classes": data.num_classes,
        "sizes": {
            "train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y), "source_train": n_source,
        },
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "sha256": data.content_hash(),
    }
    log.info(
        "prepared %s: train %d, val %d, test %d, %s, %d classes in %.1f s",
        cfg.name, len(data.train_y), len(data.val_y), len(data.test_y),
        "x".join(map(str, data.train_x.shape[1:])), data.num_classes, time.perf_counter() - t0,
    )
    return data


def save_prepared(data: PreparedData, path: str | os.PathLike) -> None:
    """Write the prepared data as one ``torch.save`` file of a plain dict (atomically)."""
    torch_save(data.to_dict(), path)


def load_prepared(path: str | os.PathLike, verify: bool = True) -> PreparedData:
    """Read a file written by :func:`save_prepared`; ``verify`` re-checks the content hash."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: prepared dataset not found (run the prepare stage first)")
    try:
        obj = safe_torch_load(path)
    except UnsafeFileError as err:
        reason = err.reason.replace("not a readable torch file", "not a readable prepared dataset")
        raise DatasetError(f"{path}: {reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != PREPARED_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DatasetError(f"{path}: not a prepared dataset of format {PREPARED_FORMAT} (found {got!r})")
    missing = [k for k in (*_TENSOR_KEYS, "mean", "std", "classes", "meta") if k not in obj]
    if missing:
        raise DatasetError(f"{path}: prepared dataset lacks {', '.join(missing)}")
    try:
        data = PreparedData(**{k: obj[k] for k in (*_TENSOR_KEYS, "mean", "std", "classes", "meta")})
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    if verify and data.meta.get("sha256") and data.content_hash() != data.meta["sha256"]:
        raise DatasetError(f"{path}: content hash mismatch (file corrupt or edited); re-run the prepare stage")
    return data
