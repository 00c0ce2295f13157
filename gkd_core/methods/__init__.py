"""Distillation methods: the registry is the only place a method's name is dispatched on.

``METHODS`` maps ``method.name`` to a :class:`~gkd_core.methods.base.MethodSpec`, which declares the
method's parameter block, schedule, terms, extra metrics and module. Adding a method is one new module that
defines a ``SPEC`` plus one line here (docs/architecture.md shows a worked example).

:func:`build_distiller` builds the module for a method configuration; :func:`method_schedule` gives the
schedule w(p) it trains under (for plots and reports).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from gkd_core.methods import akd, ces_kd, dynamic_kd, gompertz, scheduled
from gkd_core.methods.base import TERMS, Batch, Distiller, MethodContext, MethodSpec, Objective, combine
from gkd_core.methods.teacher_cache import TeacherCache, compute_teacher_cache, load_teacher_cache, save_teacher_cache
from gkd_core.schedules import Schedule
from gkd_core.sections import LossesConfig, ModelConfig

__all__ = [
    "METHODS", "MethodSpec", "MethodContext", "Objective", "Batch", "Distiller", "TERMS", "combine",
    "TeacherCache", "compute_teacher_cache", "load_teacher_cache", "save_teacher_cache", "method_spec", "method_block", "method_schedule", "method_weights",
    "describe_objective", "build_distiller", "method_module",
]

METHODS: dict[str, MethodSpec] = {
    "none": scheduled.NONE,
    "kd": scheduled.KD,
    "linear": scheduled.LINEAR,
    "cosine": scheduled.COSINE,
    "logistic": scheduled.LOGISTIC,
    "gompertz": gompertz.GOMPERTZ,
    "gompertz_kd": gompertz.GOMPERTZ_KD,
    "full_constant": gompertz.FULL_CONSTANT,
    "kd_dose_matched": gompertz.KD_DOSE_MATCHED,
    "gompertz_kd_dose_matched": gompertz.GOMPERTZ_KD_DOSE_MATCHED,
    "adaptive_gompertz": gompertz.ADAPTIVE_GOMPERTZ,
    "dynamic_kd": dynamic_kd.SPEC,
    "akd": akd.SPEC,
    "ces_kd": ces_kd.SPEC,
}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def method_block(method_cfg: Any) -> Any:
    """The selected method's own parameter block (``method.<name>``), or None for a method without one."""
    return getattr(method_cfg, method_cfg.name, None)


def method_schedule(method_cfg: Any) -> Schedule:
    """The distillation-weight schedule w(p) the configured method trains under."""
    return method_spec(method_cfg.name).schedule(method_block(method_cfg), method_cfg)


def method_weights(method_cfg: Any) -> dict[str, float]:
    """The configured method's terms and their weights (``{}`` for the student alone)."""
    return method_spec(method_cfg.name).weights(method_block(method_cfg))


def describe_objective(method_cfg: Any) -> str:
    """The configured method's objective as it will run (for reports, tables and MLflow)."""
    return method_spec(method_cfg.name).describe(method_block(method_cfg), method_cfg)


def build_distiller(
    method_cfg: Any,
    losses_cfg: LossesConfig,
    student: nn.Module,
    teacher: Optional[nn.Module],
    *,
    label_smoothing: float = 0.0,
    seed: int = 0,
    train_alone: Optional[Callable[[ModelConfig, str], nn.Module]] = None,
    schedule: Optional[Schedule] = None,
    val_accuracy: Optional[Callable[[nn.Module], float]] = None,
) -> Distiller:
    """The module of ``method_cfg.name`` (a ``method`` section of :class:`~gkd_core.config.Params`).

    ``train_alone(model_cfg, label)`` trains a network alone on the run's data (methods with helper networks,
    e.g. CES-KD's assistants, call it); ``val_accuracy(net)`` measures a network on the validation split
    (CES-KD checks its ladder with it); ``schedule`` overrides the method's own (benchmarks)."""
    spec = method_spec(method_cfg.name)
    ctx = MethodContext(
        student=student, teacher=teacher, params=method_block(method_cfg), losses=losses_cfg,
        schedule=schedule if schedule is not None else method_schedule(method_cfg),
        weights=method_weights(method_cfg), label_smoothing=label_smoothing, seed=seed, train_alone=train_alone,
        val_accuracy=val_accuracy,
    )
    if spec.needs_teacher and teacher is None:
        raise ValueError(f"method {spec.name!r} needs a teacher (only a method without one trains a model alone)")
    return method_module(spec).from_context(spec, ctx)


def method_module(spec: MethodSpec) -> type[Distiller]:
    """The module class a method trains with: its own, or the shared :class:`Distiller`."""
    return spec.distiller or Distiller
