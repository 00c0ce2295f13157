"""What a method is and how its objective is summed: the declaration (:class:`MethodSpec`, the
:class:`MethodContext` it is built from) and the objective (:class:`Objective`, :func:`combine`, the one place
the sum is written; :class:`Batch`, what a method's objective reads). The shared module is
:class:`gkd_core.methods.base.Distiller`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from pydantic import BaseModel
from torch import Tensor, nn

from gkd_core.schedules import Schedule
from gkd_core.sections import LossesConfig, ModelConfig


__all__ = ["TERMS", "MethodSpec", "MethodContext", "Objective", "Batch", "combine"]

TERMS = ("kd", "wasserstein", "grad_match")
"""The distillation terms, in the order they are summed."""


# --- declaration -----------------------------------------------------------------------------------------


class MethodSetupError(ValueError):
    """A method cannot be built from what the run gave it, and the user can fix that (e.g. CES-KD's inverted
    ladder): command lines report it in one line, as bad input (exit 2), never retried."""


@dataclass(frozen=True)
class MethodContext:
    """What building a method's module may use: the networks, the run's settings, and a way to train a
    network alone on the run's data (CES-KD trains its teacher assistants with it)."""

    student: nn.Module
    teacher: Optional[nn.Module]
    params: Optional[BaseModel]  # the method's own block (``method.<name>``), None for a method without one
    losses: LossesConfig
    schedule: Schedule
    weights: Mapping[str, float] = field(default_factory=dict)  # term -> weight, for the method's terms
    label_smoothing: float = 0.0
    seed: int = 0
    train_alone: Optional[Callable[[ModelConfig, str], nn.Module]] = None  # (model config, label) -> trained net
    val_accuracy: Optional[Callable[[nn.Module], float]] = None  # a network's accuracy on the validation split


@dataclass(frozen=True)
class MethodSpec:
    """One method, declared in one place (see the module docstring).

    Attributes:
        name: the registry key and ``method.name`` value.
        summary: one line for docs, logs and the CLI.
        schedule: ``(block, method section) -> Schedule``: w(p) from the method's parameter block (the whole
            ``method`` section is there for an arm defined against another method's schedule).
        params: the pydantic model of ``method.<name>`` (None: the method has no block). A block with a
            ``weights`` field sets the terms' weights; without one every term has weight 1.
        distiller: the module class, built with its ``from_context``; None: the shared module
            (:class:`gkd_core.methods.base.Distiller`, which imports this module; the registry resolves it).
        terms: the distillation terms the method uses (a subset of :data:`TERMS`).
        metrics: extra per-step scalars its module reports (logged as epoch means).
        needs_teacher: False only for training a network alone.
        objective: how the sum reads for this method (docs, reports, MLflow); placeholders ``{w}`` (the schedule)
            and ``{terms}`` (the weighted terms) are filled by :meth:`describe`.
    """

    name: str
    summary: str
    schedule: Callable[[Any, Any], Schedule]
    params: Optional[type[BaseModel]] = None
    distiller: Optional[type] = None
    terms: tuple[str, ...] = TERMS
    metrics: tuple[str, ...] = ()
    needs_teacher: bool = True
    objective: str = "CE + {w} * [{terms}]"

    def __post_init__(self) -> None:
        unknown = set(self.terms) - set(TERMS)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown terms {sorted(unknown)}; allowed: {', '.join(TERMS)}")

    def weights(self, block: Any) -> dict[str, float]:
        """The weight of each of the method's terms: the block's ``weights`` where it has them, else 1."""
        given = getattr(block, "weights", None)
        return {t: float(getattr(given, t)) if given is not None else 1.0 for t in self.terms}

    def describe(self, block: Any, method_cfg: Any) -> str:
        """The objective as it will run, e.g. ``CE + gompertz(a=1, b=4.605, c=5.091) * [1 KD + 1 W + 1 GM]``."""
        names = {"kd": "KD", "wasserstein": "W", "grad_match": "GM"}
        weights = self.weights(block)
        terms = " + ".join(f"{weights[t]:g} {names[t]}" for t in self.terms)
        schedule = self.schedule(block, method_cfg)
        params = ", ".join(f"{k}={v:.4g}" for k, v in schedule.state_dict().items()
                           if k != "name" and isinstance(v, (int, float)))
        w = f"{schedule.name}({params})" if params else schedule.name
        own = block.model_dump() if hasattr(block, "model_dump") else {}  # a method's own params, e.g. {total_weight}
        return self.objective.format(**own, w=w, terms=terms) if self.terms else "CE"


# --- the objective ----------------------------------------------------------------------------------------


@dataclass
class Objective:
    """What a method contributes on one batch, next to the shared CE, W and GM (see :func:`combine`)."""

    terms: dict[str, Tensor] = field(default_factory=dict)  # method-computed terms, e.g. {"kd": ...}
    ce_scale: float | Tensor = 1.0
    term_scales: dict[str, float | Tensor] = field(default_factory=dict)
    auxiliary: dict[str, Tensor] = field(default_factory=dict)  # added unweighted (trains method modules)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # reported, not optimised


def combine(ce: Tensor, ce_weight: float, w: float, terms: Mapping[str, Tensor], weights: Mapping[str, float],
            objective: Objective, distill: bool) -> Tensor:
    """``ce_weight * s_ce * CE + w * sum_i s_i * l_i * term_i + sum(auxiliary)``: the one place the objective
    is summed. ``terms`` and ``weights`` are keyed by term name, summed in :data:`TERMS` order; without
    distillation only the CE part is returned."""
    total = ce_weight * objective.ce_scale * ce
    if not distill:
        return total
    part: Optional[Tensor] = None
    for name in TERMS:
        if name in terms:
            scaled = objective.term_scales.get(name, 1.0) * weights[name] * terms[name]
            part = scaled if part is None else part + scaled
    if part is not None:
        total = total + w * part
    for extra in objective.auxiliary.values():
        total = total + extra
    return total


@dataclass
class Batch:
    """One batch after the shared forward: what a method's :meth:`~Distiller.method_objective` reads."""

    x: Tensor
    y: Tensor
    progress: float
    step: int
    student_logits: Tensor
    teacher_logits: Optional[Tensor]  # detached; None without distillation
    ce: Tensor
