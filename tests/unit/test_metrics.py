"""Classification metrics against hand-computed examples and simple reference implementations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gkd_core.metrics import (
    accuracy_topk,
    agreement,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    per_class_accuracy,
    topk_accuracy,
)


def two_class_logits(p_first: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly (p, 1 - p) per row."""
    p = torch.tensor(p_first, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()], dim=1)


# 4 samples, 3 classes; rankings per row: [0,1,2], [2,1,0], [1,0,2], [0,2,1]
LOGITS = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 0.0], [2.0, 0.0, 1.0]])
LABELS = torch.tensor([0, 1, 2, 1])


def test_topk_hand_example() -> None:
    acc = topk_accuracy(LOGITS, LABELS, ks=(1, 2, 3))
    # top1 hits: row 0 only; top2 adds row 1 (label 1 is second); top3 covers everything.
    assert acc == {"top1": 0.25, "top2": 0.5, "top3": 1.0}


def test_topk_k_capped_by_classes() -> None:
    acc = topk_accuracy(LOGITS, LABELS)  # default (1, 5) on 3 classes
    assert acc["top1"] == 0.25 and acc["top5"] == 1.0
    assert accuracy_topk is topk_accuracy


def test_topk_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        topk_accuracy(LOGITS, LABELS[:3])
    with pytest.raises(ValueError):
        topk_accuracy(LOGITS[0], LABELS)


def test_per_class_accuracy_and_absent_class() -> None:
    logits = torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [0, 2.0, 0, 0]])
    y = torch.tensor([0, 0, 1, 1, 2])  # class 3 absent
    acc = per_class_accuracy(logits, y, 4)
    torch.testing.assert_close(acc[:3], torch.tensor([1.0, 0.5, 0.0]))
    assert math.isnan(acc[3].item())
    torch.testing.assert_close(per_class_accuracy(logits.argmax(1), y, 4), acc, equal_nan=True)


def test_confusion_matrix_counts() -> None:
    preds = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    y = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    cm = confusion_matrix(preds, y, 3)
    assert cm.dtype == torch.long
    assert cm.tolist() == [[1, 0, 1], [1, 2, 0], [0, 0, 2]]  # [true][pred]
    assert cm.sum().item() == len(y)


def test_confusion_matrix_matches_counting_reference_and_accepts_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 6, generator=g)
    y = torch.randint(0, 6, (500,), generator=g)
    expected = [[0] * 6 for _ in range(6)]
    for t, p in zip(y.tolist(), logits.argmax(1).tolist()):
        expected[t][p] += 1
    assert confusion_matrix(logits, y, 6).tolist() == expected


def test_confusion_matrix_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)


def test_ece_perfectly_calibrated_is_zero() -> None:
    logits = two_class_logits([0.8] * 10)  # confidence 0.8, predicted class 0
    y = torch.tensor([0] * 8 + [1] * 2)  # 80% correct
    assert expected_calibration_error(logits, y) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_example_two_bins() -> None:
    # bin ~0.9: 2 samples, 1 correct (gap 0.4); bin ~0.6: 2 samples, 2 correct (gap 0.4).
    logits = two_class_logits([0.9, 0.9, 0.6, 0.6])
    y = torch.tensor([0, 1, 0, 0])
    assert expected_calibration_error(logits, y, n_bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    # overconfident: all correct at confidence 0.7 -> ECE 0.3
    assert expected_calibration_error(two_class_logits([0.7] * 5), torch.zeros(5, dtype=torch.long)) == (
        pytest.approx(0.3)
    )


def _ece_reference(logits: torch.Tensor, y: torch.Tensor, n_bins: int) -> float:
    probs = logits.double().softmax(1)
    conf, pred = probs.max(1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            gap = (pred[mask] == y[mask]).double().mean() - conf[mask].mean()
            total += mask.double().mean().item() * abs(gap.item())
    return total


def test_ece_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(1000, 10, generator=g)
    y = torch.randint(0, 10, (1000,), generator=g)
    assert expected_calibration_error(logits, y, 15) == pytest.approx(_ece_reference(logits, y, 15), abs=1e-9)


def test_agreement() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [0.5, 1.0]])
    assert agreement(student, teacher) == 0.75
    assert agreement(teacher, teacher) == 1.0
    with pytest.raises(ValueError):
        agreement(student, teacher[:2])


def test_classification_report_json_and_values() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 4, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)  # class 3 never occurs
    teacher = logits + 0.1 * torch.randn(50, 4, generator=g)
    report = classification_report(logits, y, 4, teacher_logits=teacher)
    json.dumps(report, allow_nan=False)  # strictly serialisable (no NaN)
    assert report["n"] == 50
    assert report["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert report["top5"] == 1.0
    assert report["per_class"][3] is None and len(report["per_class"]) == 4
    assert report["confusion_matrix"] == confusion_matrix(logits, y, 4).tolist()
    assert report["agreement"] == agreement(logits, teacher)
    assert report["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert report["balanced_accuracy"] == pytest.approx(
        sum(v for v in report["per_class"] if v is not None) / 3
    )
    assert "agreement" not in classification_report(logits, y, 4)

