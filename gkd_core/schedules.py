"""Distillation-weight schedules w(p) over training progress p in [0, 1].

A schedule is a small, pure object: ``weight(p)`` depends on p and its parameters only (no hidden step
counter), so a resumed run reproduces the weights exactly. ``state_dict()`` / ``load_state_dict()`` carry
the parameters in checkpoints.

The Gompertz curve is the method's schedule (arXiv 2510.21649): ``w(p) = a * exp(-b * exp(-c * p))``,
slow start, fast middle, saturation at ``a``. Its friendlier parameterisation: start weight
``w0 = a * exp(-b)`` and inflection point ``p* = ln(b) / c`` (where ``w = a / e``).
See docs/method.md for why these defaults.
"""

from __future__ import annotations

import abc
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar


def _check_progress(p: float) -> float:
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"progress must be in [0, 1], got {p}")
    return float(p)


@dataclass
class Schedule(abc.ABC):
    """Base class: subclasses are dataclasses whose fields are their parameters."""

    name: ClassVar[str] = "schedule"

    @abc.abstractmethod
    def weight(self, progress: float) -> float:
        """The distillation weight at progress p in [0, 1]."""

    def __call__(self, progress: float) -> float:
        return self.weight(progress)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"cannot load a {state.get('name')!r} schedule state into {self.name!r}")
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))

    @property
    def enabled(self) -> bool:
        """False when the schedule is identically zero (the distillation terms need not be computed)."""
        return True


@dataclass
class NoSchedule(Schedule):
    """w(p) = 0: the student trains alone (and the distillation terms are skipped)."""

    name: ClassVar[str] = "none"

    def weight(self, progress: float) -> float:
        _check_progress(progress)
        return 0.0

    @property
    def enabled(self) -> bool:
        return False


@dataclass
class ConstantSchedule(Schedule):
    """w(p) = a: vanilla KD (Hinton et al.)."""

    a: float = 1.0
    name: ClassVar[str] = "kd"

    def weight(self, progress: float) -> float:
        _check_progress(progress)
        return self.a


@dataclass
class LinearSchedule(Schedule):
    """w(p) = a * min(p / warmup, 1): DKD-style linear warm-up (mdistiller uses 20 of 240 epochs)."""

    a: float = 1.0
    warmup: float = 20 / 240
    name: ClassVar[str] = "linear"

    def weight(self, progress: float) -> float:
        p = _check_progress(progress)
        return self.a * min(p / self.warmup, 1.0) if self.warmup > 0 else self.a


@dataclass
class CosineSchedule(Schedule):
    """w(p) = a * (1 - cos(pi * min(p / warmup, 1))) / 2: a smooth ramp from 0 to a."""

    a: float = 1.0
    warmup: float = 0.5
    name: ClassVar[str] = "cosine"

    def weight(self, progress: float) -> float:
        p = _check_progress(progress)
        r = min(p / self.warmup, 1.0) if self.warmup > 0 else 1.0
        return self.a * 0.5 * (1.0 - math.cos(math.pi * r))


@dataclass
class LogisticSchedule(Schedule):
    """w(p) = a / (1 + exp(-k (p - p0))): the symmetric S-curve, the Gompertz curve's natural foil."""

    a: float = 1.0
    k: float = 10.0
    p0: float = 0.5
    name: ClassVar[str] = "logistic"

    def weight(self, progress: float) -> float:
        p = _check_progress(progress)
        return self.a / (1.0 + math.exp(-self.k * (p - self.p0)))


@dataclass
class GompertzSchedule(Schedule):
    """w(p) = a * exp(-b * exp(-c * p)): asymmetric S-curve, inflection at p* = ln(b)/c where w = a/e."""

    a: float = 1.0
    b: float = -math.log(0.01)  # w0 = 1% of a
    c: float = math.log(-math.log(0.01)) / 0.3  # inflection at 30% of training
    name: ClassVar[str] = "gompertz"

    def weight(self, progress: float) -> float:
        p = _check_progress(progress)
        return self.a * math.exp(-self.b * math.exp(-self.c * p))

    @classmethod
    def from_shape(cls, w_max: float, w0: float, p_inflection: float) -> "GompertzSchedule":
        """Build from the start weight ``w0`` (0 < w0 < w_max / e) and the inflection point p* in (0, 1]."""
        if not w_max > 0:
            raise ValueError(f"w_max must be > 0, got {w_max}")
        if not 0 < w0 < w_max / math.e:
            raise ValueError(
                f"w0 must be in (0, w_max/e) = (0, {w_max / math.e:.6g}) so that the curve has an inflection "
                f"after the start, got {w0}"
            )
        if not 0 < p_inflection <= 1:
            raise ValueError(f"p_inflection must be in (0, 1], got {p_inflection}")
        b = -math.log(w0 / w_max)
        return cls(a=w_max, b=b, c=math.log(b) / p_inflection)

    @property
    def w0(self) -> float:
        """The weight at p = 0."""
        return self.a * math.exp(-self.b)

    @property
    def p_inflection(self) -> float:
        """Progress at the inflection point, ln(b)/c (meaningful for b > 1)."""
        return math.log(self.b) / self.c


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "none": NoSchedule,
    "kd": ConstantSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "logistic": LogisticSchedule,
    "gompertz": GompertzSchedule,
}


def build_schedule(name: str, **params: Any) -> Schedule:
    """Construct a schedule by registry name; Gompertz also accepts ``w_max``/``w0``/``p_inflection``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if name == "gompertz" and {"w0", "p_inflection"} & params.keys():
        return GompertzSchedule.from_shape(params.get("w_max", params.get("a", 1.0)), params["w0"], params["p_inflection"])
    return SCHEDULES[name](**params)


def schedule_curve(schedule: Schedule, points: int = 201) -> tuple[list[float], list[float]]:
    """Sample ``(progress, weight)`` on an even grid over [0, 1] (for plots and CSVs)."""
    ps = [i / (points - 1) for i in range(points)]
    return ps, [schedule.weight(p) for p in ps]
