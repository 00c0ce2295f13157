"""Hinton KD under a schedule: the student alone (``none``), vanilla KD (``kd``, constant weight), the
DKD-style linear warm-up (``linear``), a cosine ramp (``cosine``) and the logistic S-curve (``logistic``).

Each is ``CE + w(p) * KD``: no feature or gradient terms, so a row called ``kd`` is Hinton's KD. The block of
each in params.yaml holds its schedule's parameters (``a`` is the weight the schedule reaches).
"""

from __future__ import annotations

from pydantic import Field

from gkd_core.methods.base import MethodSpec
from gkd_core.schedules import ConstantSchedule, CosineSchedule, LinearSchedule, LogisticSchedule, NoSchedule
from gkd_core.sections import Strict


class ConstantParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="constant KD weight")


class LinearParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="KD weight reached at the end of the warm-up")
    warmup: float = Field(20 / 240, gt=0.0, le=1.0, description="fraction of training to reach a")


class CosineParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="KD weight reached at the end of the ramp")
    warmup: float = Field(0.5, gt=0.0, le=1.0, description="fraction of training the ramp takes")


class LogisticParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="upper asymptote of the KD weight")
    k: float = Field(10.0, gt=0.0, le=1000.0, description="steepness")
    p0: float = Field(0.5, ge=0.0, le=1.0, description="midpoint as a fraction of training")


NONE = MethodSpec("none", "the student alone: cross-entropy, no teacher", schedule=lambda *_: NoSchedule(),
                  terms=(), needs_teacher=False)
KD = MethodSpec("kd", "vanilla KD (Hinton): CE + a * KD", params=ConstantParams,
                schedule=lambda p, _: ConstantSchedule(a=p.a), terms=("kd",))
LINEAR = MethodSpec("linear", "KD with DKD's linear warm-up: CE + a * min(p / warmup, 1) * KD", params=LinearParams,
                    schedule=lambda p, _: LinearSchedule(**p.model_dump()), terms=("kd",))
COSINE = MethodSpec("cosine", "KD with a cosine ramp to a over warmup", params=CosineParams,
                    schedule=lambda p, _: CosineSchedule(**p.model_dump()), terms=("kd",))
LOGISTIC = MethodSpec("logistic", "KD with a logistic S-curve weight a / (1 + exp(-k (p - p0)))",
                      params=LogisticParams, schedule=lambda p, _: LogisticSchedule(**p.model_dump()), terms=("kd",))
