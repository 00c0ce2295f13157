"""Classification metrics as vectorised torch ops (no per-sample Python loops).

Conventions: ``logits`` are ``(N, C)`` float tensors, labels ``y`` are ``(N,)`` integer tensors; functions
that accept predictions take either ``(N,)`` class indices or ``(N, C)`` logits (argmax is applied).
Confusion matrices are indexed ``[true, predicted]``. Everything is computed on the inputs' device and
returned as Python numbers or CPU tensors where noted.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "topk_accuracy",
    "accuracy_topk",
    "per_class_accuracy",
    "confusion_matrix",
    "expected_calibration_error",
    "agreement",
    "classification_report",
]


def _check_logits(logits: Tensor, y: Tensor | None = None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if y is not None and (y.dim() != 1 or y.shape[0] != logits.shape[0]):
        raise ValueError(f"labels must be (N,) with N={logits.shape[0]}, got shape {tuple(y.shape)}")


def _as_preds(logits_or_preds: Tensor) -> Tensor:
    """Class indices from ``(N,)`` predictions or ``(N, C)`` logits."""
    if logits_or_preds.dim() == 2:
        return logits_or_preds.argmax(dim=1)
    if logits_or_preds.dim() == 1:
        return logits_or_preds.long()
    raise ValueError(f"expected (N,) predictions or (N, C) logits, got shape {tuple(logits_or_preds.shape)}")


def _check_labels(t: Tensor, num_classes: int, what: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")


def topk_accuracy(logits: Tensor, y: Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k, as ``{"top1": ..., "top5": ...}``.

    k is capped at the number of classes (so top-5 on a 3-class problem is top-3, i.e. 1.0); the key keeps
    the requested k. An empty batch gives NaN.
    """
    _check_logits(logits, y)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    n, c = logits.shape
    if n == 0:
        return {f"top{k}": float("nan") for k in ks}
    kmax = min(max(ks), c)
    top = logits.topk(kmax, dim=1).indices  # (N, kmax), best first
    hits = (top == y.view(-1, 1)).cumsum(dim=1).clamp_(max=1)  # hits[:, j]: true label within top j+1
    rate = hits.float().mean(dim=0)
    return {f"top{k}": float(rate[min(k, c) - 1]) for k in ks}


accuracy_topk = topk_accuracy


def per_class_accuracy(logits_or_preds: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Recall per class, shape ``(num_classes,)`` float; NaN for classes with no samples in ``y``."""
    preds = _as_preds(logits_or_preds)
    _check_labels(y, num_classes, "labels")
    y = y.long()
    total = torch.bincount(y, minlength=num_classes).double()
    correct = torch.bincount(y[preds == y], minlength=num_classes).double()
    acc = correct / total
    return acc.float().cpu()


def confusion_matrix(preds: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Counts ``cm[true, predicted]`` as a ``(C, C)`` LongTensor (``preds`` may also be logits)."""
    preds = _as_preds(preds)
    if preds.shape != y.shape:
        raise ValueError(f"preds and labels differ in shape: {tuple(preds.shape)} vs {tuple(y.shape)}")
    _check_labels(y, num_classes, "labels")
    _check_labels(preds, num_classes, "predictions")
    flat = y.long() * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def expected_calibration_error(logits: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins ``(i/B, (i+1)/B]`` of
    ``|bin| / N * |accuracy(bin) - mean confidence(bin)|``, with confidence = max softmax probability."""
    _check_logits(logits, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if logits.shape[0] == 0:
        return float("nan")
    probs = torch.softmax(logits.double(), dim=1)
    conf, preds = probs.max(dim=1)
    correct = (preds == y).double()
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=logits.device)[1:-1]
    bins = torch.bucketize(conf, inner)  # right-closed bins; 0 < conf <= 1
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / logits.shape[0])


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Fraction of samples where student and teacher top-1 predictions coincide."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    _check_logits(student_logits)
    if student_logits.shape[0] == 0:
        return float("nan")
    return float((student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).double().mean())


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def classification_report(
    logits: Tensor,
    y: Tensor,
    num_classes: int,
    teacher_logits: Tensor | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """All metrics of one split as a JSON-serialisable dict.

    Keys: ``n``, ``num_classes``, ``accuracy``, ``top5`` (k capped at ``num_classes``), ``nll`` (mean
    cross-entropy), ``ece``, ``balanced_accuracy`` (mean recall over classes present), ``per_class`` (list;
    ``None`` for classes absent from ``y``), ``confusion_matrix`` (nested list, ``[true][pred]``) and, when
    ``teacher_logits`` is given, ``agreement``.
    """
    _check_logits(logits, y)
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} columns but num_classes={num_classes}")
    logits = logits.detach()
    y = y.detach().long()
    top = topk_accuracy(logits, y, ks=(1, 5))
    pca = per_class_accuracy(logits, y, num_classes)
    present = pca[~torch.isnan(pca)]
    nll = torch.nn.functional.cross_entropy(logits.double(), y).item() if y.numel() else float("nan")
    report: dict[str, Any] = {
        "n": int(y.numel()),
        "num_classes": int(num_classes),
        "accuracy": top["top1"],
        "top5": top["top5"],
        "nll": float(nll),
        "ece": expected_calibration_error(logits, y, n_bins=n_bins),
        "balanced_accuracy": float(present.mean()) if present.numel() else float("nan"),
        "per_class": _nan_to_none(pca.tolist()),
        "confusion_matrix": confusion_matrix(logits, y, num_classes).tolist(),
    }
    if teacher_logits is not None:
        report["agreement"] = agreement(logits, teacher_logits.detach().to(logits.device))
    for key in ("accuracy", "top5", "nll", "ece", "balanced_accuracy", "agreement"):
        if key in report and math.isnan(report[key]):
            report[key] = None
    return report
