"""The paper's method and its ablations, each a named arm (arXiv 2510.21649, as read in docs/method.md).

| name | objective |
|---|---|
| ``gompertz`` | CE + w(p) [l_kd KD + l_w W + l_g GM], w = a exp(-b exp(-c p)): the paper's full objective |
| ``gompertz_kd`` | CE + w(p) KD, the same Gompertz curve on Hinton KD only (is it the curve or the extra terms?) |
| ``full_constant`` | CE + a [l_kd KD + l_w W + l_g GM]: the full objective at a constant weight (is it the curve?) |
| ``kd_dose_matched`` | CE + mean(w) KD: constant KD at the mean weight of ``method.gompertz``'s curve, computed, so a Gompertz-vs-KD difference is not a difference in total dose |
| ``gompertz_kd_dose_matched`` | CE + (a_kd / mean(shape)) shape(p) KD: ``method.gompertz``'s curve shape on Hinton KD, scaled so its mean weight is ``kd``'s (``method.kd.a``): the dose control the other way round |
| ``adaptive_gompertz`` | the full objective, its Gompertz weight re-timed online to the student's validation curve |
"""

from __future__ import annotations

import math

from pydantic import Field

from gkd_core.methods.base import MethodSpec
from gkd_core.schedules import AdaptiveGompertzSchedule, ConstantSchedule, GompertzSchedule, schedule_mean
from gkd_core.sections import Strict

_B = round(-math.log(0.01), 4)  # w0 = 1% of a
_C = round(math.log(-math.log(0.01)) / 0.3, 4)  # inflection at 30% of training


class TermWeights(Strict):
    """Weights of the full objective's terms (l_kd, l_w, l_g)."""

    kd: float = Field(1.0, ge=0.0, le=100.0, description="l_kd: Hinton KD (T^2 KL)")
    wasserstein: float = Field(1.0, ge=0.0, le=100.0, description="l_w: feature Wasserstein")
    grad_match: float = Field(1.0, ge=0.0, le=100.0, description="l_g: gradient matching")


class GompertzCurve(Strict):
    """w(p) = a*exp(-b*exp(-c*p)). Defaults: w0 = 0.01*a, inflection at p* = 0.3 (see docs/method.md)."""

    a: float = Field(1.0, gt=0.0, le=100.0, description="upper asymptote (saturation weight)")
    b: float = Field(_B, gt=0.0, le=100.0, description="displacement: w0 = a*exp(-b)")
    c: float = Field(_C, gt=0.0, le=1000.0, description="growth rate: inflection at p* = ln(b)/c")


class GompertzParams(GompertzCurve):
    weights: TermWeights = Field(default_factory=TermWeights)


class ConstantFullParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="constant weight of the full objective")
    weights: TermWeights = Field(default_factory=TermWeights)


class AdaptiveGompertzParams(Strict):
    a: float = Field(1.0, gt=0.0, le=100.0, description="upper asymptote (saturation weight)")
    b: float = Field(_B, gt=0.0, le=100.0, description="prior displacement, used until the first fit")
    c: float = Field(_C, gt=0.0, le=1000.0, description="prior growth rate, used until the first fit")
    min_points: int = Field(3, ge=3, le=1000, description="validation evaluations before the first fit")
    weights: TermWeights = Field(default_factory=TermWeights)


class DoseMatchedParams(Strict):
    """No knobs: the weight is the mean of ``method.gompertz``'s curve over training (computed)."""


def _curve(p: GompertzCurve) -> GompertzSchedule:
    return GompertzSchedule(a=p.a, b=p.b, c=p.c)


GOMPERTZ = MethodSpec("gompertz", "the paper: CE + Gompertz w(p) * [KD + W + GM]", params=GompertzParams,
                      schedule=lambda p, _: _curve(p))
GOMPERTZ_KD = MethodSpec("gompertz_kd", "ablation: the Gompertz curve on Hinton KD only", params=GompertzCurve,
                         schedule=lambda p, _: _curve(p), terms=("kd",))
FULL_CONSTANT = MethodSpec("full_constant", "ablation: the full objective (KD + W + GM) at a constant weight",
                           params=ConstantFullParams, schedule=lambda p, _: ConstantSchedule(a=p.a))
KD_DOSE_MATCHED = MethodSpec(
    "kd_dose_matched", "ablation: constant KD at the mean weight of method.gompertz's curve",
    params=DoseMatchedParams, terms=("kd",),
    schedule=lambda _, method: ConstantSchedule(a=schedule_mean(_curve(method.gompertz))),
)

def _at_kd_dose(method: object) -> GompertzSchedule:
    """``method.gompertz``'s curve (b, c: its shape) with ``a`` chosen so that its mean weight over training is
    ``method.kd.a``: w(p) = a' exp(-b exp(-c p)), a' = a_kd / mean(exp(-b exp(-c p)))."""
    g = method.gompertz  # type: ignore[attr-defined]
    shape_mean = schedule_mean(GompertzSchedule(a=1.0, b=g.b, c=g.c))
    return GompertzSchedule(a=method.kd.a / shape_mean, b=g.b, c=g.c)  # type: ignore[attr-defined]


GOMPERTZ_KD_DOSE_MATCHED = MethodSpec(
    "gompertz_kd_dose_matched", "ablation: method.gompertz's curve on Hinton KD, scaled to kd's mean weight",
    params=DoseMatchedParams, terms=("kd",), schedule=lambda _, method: _at_kd_dose(method),
)
ADAPTIVE_GOMPERTZ = MethodSpec(
    "adaptive_gompertz", "ours: the full objective, Gompertz weight re-timed to the student's validation curve",
    params=AdaptiveGompertzParams,
    schedule=lambda p, _: AdaptiveGompertzSchedule(a=p.a, b=p.b, c=p.c, min_points=p.min_points),
)
