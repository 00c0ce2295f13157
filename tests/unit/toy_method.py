"""A toy distillation method written the way a contributor adds one: this module plus one registry line
(``METHODS["toy"] = toy_method.SPEC``; the test does it with monkeypatch). KD against a sharpened teacher,
at a constant weight, reporting the teacher's mean confidence."""

from __future__ import annotations

import torch
from pydantic import Field

from gkd_core.losses import kd_loss
from gkd_core.methods import Batch, Distiller, MethodSpec, Objective
from gkd_core.schedules import ConstantSchedule
from gkd_core.sections import Strict


class ToyParams(Strict):
    a: float = Field(0.5, ge=0.0, le=10.0, description="constant weight")
    sharpen: float = Field(2.0, gt=0.0, le=10.0, description="teacher logits are multiplied by this")


class ToyDistiller(Distiller):
    def method_objective(self, batch: Batch) -> Objective:
        assert batch.teacher_logits is not None
        target = batch.teacher_logits * self.params.sharpen
        confidence = torch.softmax(batch.teacher_logits.float(), -1).amax(-1).mean()
        return Objective(terms={"kd": kd_loss(batch.student_logits, target, self.losses_cfg.temperature)},
                         metrics={"teacher_confidence": confidence})


SPEC = MethodSpec("toy", "toy: KD against a sharpened teacher", params=ToyParams,
                  schedule=lambda p, _: ConstantSchedule(a=p.a), distiller=ToyDistiller, terms=("kd",),
                  metrics=("teacher_confidence",))
