"""DynamicKD (Zhu et al., arXiv 2305.05233): a learnable entropy controller on the student's KD logits.

Our reading (the paper's exact update rule is unpublished): a positive scalar ``c = exp(log_c)``, initialised
to 1, multiplies the student logits *inside the KD term only*::

    KD_c  = T^2 * KL(softmax(z_t / T) || softmax(c * z_s / T))
    total = ce_weight * CE(z_s, y) + a * KD_c

``c`` acts as a student-side inverse temperature: it corrects the student's output entropy toward the
teacher's. CE (and every other term) sees the raw logits, so ``c`` gets gradient *only* from the KD term,
which is the paper's "controller updated by the distillation loss"; the student's gradient is that of the same
objective with ``c`` held at its current value. ``log_c`` parameterises positivity; it trains with the
student's optimizer in its own parameter group (lr ``controller_lr_scale * base_lr``, no weight decay). The
schedule is constant (``a``). Reported: ``entropy_scale`` = ``c``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from pydantic import Field
from torch import nn

from gkd_core.losses import kd_loss
from gkd_core.methods.base import Batch, Distiller, MethodSpec, Objective
from gkd_core.schedules import ConstantSchedule
from gkd_core.sections import Strict

logger = logging.getLogger(__name__)


class DynamicKDParams(Strict):
    """DynamicKD: constant weight a; a learnable student-logit scale (entropy controller) trained by KD only."""

    a: float = Field(1.0, ge=0.0, le=100.0)
    controller_lr_scale: float = Field(1.0, gt=0.0, le=100.0)


class DynamicKDDistiller(Distiller):
    """The standard objective with the KD term on ``c * z_s`` (see the module docstring)."""

    params: DynamicKDParams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.distill:
            raise ValueError("DynamicKD needs a teacher and an enabled schedule")
        self.params = self.params if self.params is not None else DynamicKDParams()
        if not self.use_kd:
            logger.warning("DynamicKD with its KD weight 0: the entropy controller receives no gradient")
        self.log_c = nn.Parameter(torch.zeros(()))

    @property
    def entropy_scale(self) -> torch.Tensor:
        return self.log_c.exp()

    def method_parameters(self) -> Iterator[nn.Parameter]:
        yield self.log_c

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        return super().param_groups(base_lr) + [
            {"params": [self.log_c], "lr": base_lr * self.params.controller_lr_scale, "weight_decay": 0.0,
             "name": "entropy_controller"}
        ]

    def method_objective(self, batch: Batch) -> Objective:
        c = self.log_c.float().exp()
        objective = Objective(metrics={"entropy_scale": c.detach()})
        if self.use_kd:
            assert batch.teacher_logits is not None
            objective.terms["kd"] = kd_loss(c * batch.student_logits.float(), batch.teacher_logits,
                                            self.losses_cfg.temperature)
        return objective


SPEC = MethodSpec("dynamic_kd", "DynamicKD: constant weight a + a learnable student-logit scale (entropy controller)",
                  params=DynamicKDParams, schedule=lambda p, _: ConstantSchedule(a=p.a), distiller=DynamicKDDistiller,
                  terms=("kd",), metrics=("entropy_scale",), objective="CE + {w} * [KD(c * z_s)]")
