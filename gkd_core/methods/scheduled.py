"""The methods that differ only by their distillation-weight schedule w(p): the student alone (``none``),
vanilla KD (``kd``, constant), the DKD-style linear ramp (``linear``), a cosine ramp, the logistic S-curve and
the paper's Gompertz curve. Each is the standard :class:`~gkd_core.methods.base.Distiller`; its block in
params.yaml holds the schedule's parameters.
"""

from __future__ import annotations

import math

from pydantic import Field

from gkd_core.methods.base import MethodSpec
from gkd_core.schedules import (
    ConstantSchedule,
    CosineSchedule,
    GompertzSchedule,
    LinearSchedule,
    LogisticSchedule,
    NoSchedule,
)
from gkd_core.sections import Strict


class ConstantParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="constant distillation weight")


class LinearParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0)
    warmup: float = Field(20 / 240, gt=0.0, le=1.0, description="fraction of training to reach a")


class CosineParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0)
    warmup: float = Field(0.5, gt=0.0, le=1.0)


class LogisticParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0)
    k: float = Field(10.0, gt=0.0, le=1000.0, description="steepness")
    p0: float = Field(0.5, ge=0.0, le=1.0, description="midpoint as a fraction of training")


class GompertzParams(Strict):
    """w(p) = a*exp(-b*exp(-c*p)). Defaults: w0 = 0.01*a, inflection at p* = 0.3 (see docs/method.md)."""

    a: float = Field(1.0, gt=0.0, le=100.0, description="upper asymptote (saturation weight)")
    b: float = Field(round(-math.log(0.01), 4), gt=0.0, le=100.0, description="displacement: w0 = a*exp(-b)")
    c: float = Field(round(math.log(-math.log(0.01)) / 0.3, 4), gt=0.0, le=1000.0, description="growth rate")


NONE = MethodSpec("none", "the student alone: cross-entropy, no teacher", schedule=lambda _: NoSchedule(),
                  terms=(), needs_teacher=False)
KD = MethodSpec("kd", "vanilla KD (Hinton): constant weight a", params=ConstantParams,
                schedule=lambda p: ConstantSchedule(**p.model_dump()))
LINEAR = MethodSpec("linear", "DKD-style linear warm-up: a * min(p / warmup, 1)", params=LinearParams,
                    schedule=lambda p: LinearSchedule(**p.model_dump()))
COSINE = MethodSpec("cosine", "cosine ramp to a over warmup", params=CosineParams,
                    schedule=lambda p: CosineSchedule(**p.model_dump()))
LOGISTIC = MethodSpec("logistic", "logistic S-curve a / (1 + exp(-k (p - p0)))", params=LogisticParams,
                      schedule=lambda p: LogisticSchedule(**p.model_dump()))
GOMPERTZ = MethodSpec("gompertz", "Gompertz curve a * exp(-b * exp(-c p)) (the paper)", params=GompertzParams,
                      schedule=lambda p: GompertzSchedule(**p.model_dump()))
