"""The frozen teacher's outputs computed once over the training split (``runtime.cache_teacher``).

With augmentation off every epoch shows the teacher the same images, so its logits and penultimate features
can be computed once (batched, ``inference_mode``, bf16 autocast on CUDA) and kept on the device. After
:meth:`~gkd_core.methods.base.Distiller.attach_teacher_cache`, ``forward(..., index=idx)`` (the training
loader's row numbers) reads them instead of calling the teacher. Input-gradient matching needs the teacher's
input gradient and refuses a cache.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from gkd_core.data import Normalizer
from gkd_core.io import safe_torch_load, torch_save
from gkd_core.models import FeatureHook

logger = logging.getLogger(__name__)

__all__ = ["TeacherCache", "compute_teacher_cache", "save_teacher_cache", "load_teacher_cache"]


@dataclass
class TeacherCache:
    """The frozen teacher's outputs on the (unaugmented) training split, row ``i`` = training image ``i``.

    ``logits`` ``(N, C)`` and ``features`` ``(N, D)`` (penultimate, or None when not needed) on the training
    device, in the dtype the teacher produced them (bf16 under CUDA autocast: exactly what an online teacher
    forward would hand the losses).
    """

    logits: Tensor
    features: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logits, self.features) if t is not None)


def compute_teacher_cache(
    teacher: nn.Module,
    x_uint8: Tensor,
    mean: Tensor,
    std: Tensor,
    device: torch.device | str,
    *,
    batch_size: int = 512,
    amp: bool = True,
    channels_last: bool = False,
    features: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over uint8 NCHW images ``x_uint8`` (normalised exactly as the loaders do, no
    augmentation), in batches of ``batch_size`` under ``torch.inference_mode`` (bf16 autocast on CUDA when
    ``amp``); keep logits and, with ``features``, the penultimate features on ``device``.

    The images may live on the host or on ``device``; only one batch at a time is moved. The teacher is put in
    eval mode and must already be on ``device``.
    """
    device = torch.device(device)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise ValueError(f"x_uint8 must be a uint8 NCHW tensor, got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    normalise = Normalizer(mean, std, x_uint8.shape[1], device)
    teacher.eval()
    hook = FeatureHook(teacher) if features else None
    logits, feats = [], []
    t0 = time.perf_counter()
    try:
        for lo in range(0, x_uint8.shape[0], batch_size):
            xb = normalise(x_uint8[lo : lo + batch_size].to(device, non_blocking=True))
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=amp and device.type == "cuda"):
                logits.append(teacher(xb))
                if hook is not None:
                    assert hook.features is not None
                    feats.append(hook.features.flatten(1))
    finally:
        if hook is not None:
            hook.remove()
    # cat outside inference mode: the cache rows are ordinary tensors (the KD backward may save them)
    cache = TeacherCache(torch.cat(logits), torch.cat(feats) if feats else None)
    logger.info("teacher cache: %d images, %.1f MB on %s in %.1f s", len(cache), cache.nbytes / 2**20, device,
                time.perf_counter() - t0)
    return cache


def save_teacher_cache(cache: TeacherCache, path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Write ``cache`` (on the CPU) with ``meta`` (what it was computed from: the teacher file's and
    the data's sha256) atomically: a sweep computes it once and its points read it (:func:`load_teacher_cache`)."""
    save = {"logits": cache.logits.detach().cpu(), "meta": dict(meta)}  # in the dtype the teacher produced
    if cache.features is not None:
        save["features"] = cache.features.detach().cpu()
    torch_save(save, path)


def load_teacher_cache(path: str | os.PathLike, meta: dict[str, Any], rows: int, device: torch.device | str,
                       features: bool) -> Optional[TeacherCache]:
    """The cache of ``path`` on ``device`` when it was computed from what ``meta`` names, holds ``rows`` rows and
    (with ``features``) the features; otherwise None, said in the log (the caller computes its own). Loaded
    with ``weights_only`` (tensors and plain data only)."""
    try:
        saved = safe_torch_load(path)
    except (OSError, ValueError, RuntimeError) as err:
        logger.warning("teacher cache %s not used: %s", path, err)
        return None
    problem = None
    if not isinstance(saved, dict) or not isinstance(saved.get("logits"), Tensor):
        problem = "not a teacher cache"
    elif saved.get("meta") != meta:
        problem = f"computed from {saved.get('meta')}, not {meta}"
    elif saved["logits"].shape[0] != rows or (features and not isinstance(saved.get("features"), Tensor)):
        problem = f"{saved['logits'].shape[0]} rows{'' if saved.get('features') is not None else ', no features'}"
    if problem:
        logger.warning("teacher cache %s not used: %s", path, problem)
        return None
    device = torch.device(device)
    cache = TeacherCache(saved["logits"].to(device), saved["features"].to(device) if features else None)
    logger.info("teacher cache: %d images read from %s (computed once for the sweep)", len(cache), path)
    return cache
