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
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

logger = logging.getLogger(__name__)


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
        """Restore the parameters of :meth:`state_dict`. A field declared ``float`` is restored as a float
        whatever the type of the value it replaces (a schedule built with ``b=1`` takes a loaded ``4.6``)."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"cannot load a {state.get('name')!r} schedule state into {self.name!r}")
        for f in fields(self):
            value = state[f.name]
            if f.type in ("float", float):
                value = float(value)
            elif f.type in ("int", int):
                value = int(value)
            setattr(self, f.name, value)

    def observe(self, progress: float, metrics: Mapping[str, float]) -> None:
        """Told the epoch's metrics (``val_accuracy`` when the epoch was evaluated) at ``progress``, after the
        epoch; a schedule that adapts to the run overrides it (the others ignore it)."""

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
    """w(p) = a: a constant weight (vanilla KD, Hinton et al., is KD at a constant weight)."""

    a: float = 1.0
    name: ClassVar[str] = "constant"

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


def gompertz_curve(p: np.ndarray | float, a: float, b: float, c: float) -> np.ndarray | float:
    """``a * exp(-b * exp(-c * p))`` (numpy, vectorised)."""
    return a * np.exp(-b * np.exp(-c * np.asarray(p, dtype=np.float64)))


@dataclass
class AdaptiveGompertzSchedule(Schedule):
    """A Gompertz weight re-timed to the student's own learning curve (our extension; docs/method.md).

    Until ``min_points`` validation accuracies have been observed, ``w(p) = a * exp(-b * exp(-c * p))`` with the
    prior ``(b, c)``. After each later evaluation the student's curve so far, ``acc(p) ~ A exp(-B exp(-C p))``, is
    fitted by least squares (``A`` in [max acc, 1], ``B`` in [0.05, 20], ``C`` in [0.5, 50]) and the weight takes
    its timing: ``(b, c) = (B, C)``, i.e. w rises where the student's accuracy rises and saturates with it, up
    to ``a``. The fit only uses evaluations already made (causal); a failed fit keeps the previous timing.
    ``observations`` and the current ``(b, c)`` are the schedule's state, checkpointed with it.
    """

    a: float = 1.0
    b: float = -math.log(0.01)
    c: float = math.log(-math.log(0.01)) / 0.3
    min_points: int = 3
    observations: list = field(default_factory=list)  # [[progress, val_accuracy], ...]
    name: ClassVar[str] = "adaptive_gompertz"

    B_BOUNDS: ClassVar[tuple[float, float]] = (0.05, 20.0)
    C_BOUNDS: ClassVar[tuple[float, float]] = (0.5, 50.0)

    def weight(self, progress: float) -> float:
        p = _check_progress(progress)
        return self.a * math.exp(-self.b * math.exp(-self.c * p))

    @property
    def p_inflection(self) -> float:
        return math.log(self.b) / self.c if self.b > 1 else 0.0

    def observe(self, progress: float, metrics: Mapping[str, float]) -> None:
        value = metrics.get("val_accuracy")
        if value is None or not math.isfinite(float(value)):
            return
        self.observations.append([float(progress), float(value)])
        if len(self.observations) >= self.min_points:
            fitted = fit_gompertz(self.observations, prior=(self.b, self.c))
            if fitted is not None:
                self.b, self.c = fitted[1], fitted[2]
                logger.info("adaptive gompertz: %d points -> b=%.3f c=%.3f (inflection p*=%.3f)",
                            len(self.observations), self.b, self.c, self.p_inflection)


def fit_gompertz(points: Sequence[Sequence[float]], prior: tuple[float, float] = (4.6, 5.1)
                 ) -> tuple[float, float, float] | None:
    """Least-squares ``(A, B, C)`` of ``A exp(-B exp(-C p))`` through ``points`` (progress, value), within
    :class:`AdaptiveGompertzSchedule`'s bounds; None when the fit does not converge."""
    p = np.array([q[0] for q in points], dtype=np.float64)
    v = np.array([q[1] for q in points], dtype=np.float64)
    top = float(max(v.max(), 1e-6))
    lo = (top, AdaptiveGompertzSchedule.B_BOUNDS[0], AdaptiveGompertzSchedule.C_BOUNDS[0])
    hi = (max(1.0, top + 1e-9), AdaptiveGompertzSchedule.B_BOUNDS[1], AdaptiveGompertzSchedule.C_BOUNDS[1])
    start = [min(max(top, lo[0]), hi[0]), *(min(max(x, l), h) for x, l, h in zip(prior, lo[1:], hi[1:]))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (A, B, C), _ = curve_fit(gompertz_curve, p, v, p0=start, bounds=(lo, hi), maxfev=2000)
    except (RuntimeError, ValueError) as err:
        logger.warning("adaptive gompertz: fit failed (%s); keeping the previous timing", err)
        return None
    return float(A), float(B), float(C)


def schedule_mean(schedule: Schedule, points: int = 10_001) -> float:
    """The mean weight over training, the integral of w(p) over [0, 1] (trapezoid rule on ``points``): the
    "dose" a constant weight must have to give the same total distillation weight."""
    ps = np.linspace(0.0, 1.0, points)
    ws = np.array([schedule.weight(float(q)) for q in ps])
    return float(np.trapezoid(ws, ps))


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "none": NoSchedule,
    "constant": ConstantSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "logistic": LogisticSchedule,
    "gompertz": GompertzSchedule,
    "adaptive_gompertz": AdaptiveGompertzSchedule,
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
