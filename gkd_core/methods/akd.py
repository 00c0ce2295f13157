"""AKD (Li, arXiv 2509.05319): gap-adaptive CE/KD balance + context-aware teacher reweighting.

Our reading (formula, CAM architecture and hyper-parameters are not public):

* gap-based balance, per batch, detached (a schedule-like weight, not trained)::

      alpha = 1 - exp(-beta * KL_batch(softmax(z_t) || softmax(z_s)))      (T = 1, batch mean)

  a large teacher-student gap puts the weight on the hard labels, a small one on the teacher.
* CAM (:class:`ContextAwareModule`): ``log p~_t = normalise(log m + log_softmax(z_t / T))``, i.e.
  ``p~_t = normalize(m * p_t^T)``, the teacher's tempered distribution reweighted per class.
* objective::

      KD~   = T^2 * KL(p~_t || softmax(z_s / T))            (p~_t detached: the student cannot move its target)
      CAM   = CE(normalize(m * softmax(z_t)), y)             (trains the CAM only; teacher logits are detached)
      total = ce_weight * alpha * CE + (1 - alpha) * KD~ + CAM

  (the schedule is constant 1: alpha does the balancing). The CAM is *not* trained on the KD loss: jointly minimising
  KD over the target would collapse ``p~_t`` onto the student's prediction. Its own objective makes the
  reweighted teacher a better predictor of the label in context (correcting systematic teacher confusions);
  its last layer starts at zero so the run begins as plain gap-weighted KD. Known risk: CE also rewards
  sharpening ``p~_t``, which thins the dark knowledge; ``m`` is bounded by ``C``. With several processes the
  gap is that of the global batch (the mean over the ranks' equal batches).

Reported: ``alpha`` and ``cam`` (the CAM's CE).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from gkd_core import distributed
from gkd_core.methods.base import Batch, Distiller, MethodSpec, Objective
from gkd_core.models import classifier_of
from gkd_core.schedules import ConstantSchedule
from gkd_core.sections import Strict


class AKDParams(Strict):
    """AKD: alpha from the teacher-student gap, alpha = 1 - exp(-beta * KL); context-aware teacher reweighting."""

    beta: float = Field(1.0, gt=0.0, le=100.0)
    cam_hidden: int = Field(64, ge=4, le=4096)


class ContextAwareModule(nn.Module):
    """AKD's Context-Aware Module (our reading): per-sample class weights ``m`` from the teacher's output.

    ``q = MLP(log_softmax(z_t))`` (C -> hidden -> hidden, GELU), attention of that query over learned class
    keys ``K`` (C x hidden): ``m = C * softmax(q K^T / sqrt(hidden))``, so weights are positive and average 1.
    The MLP's last layer starts at zero, hence ``m == 1`` (no reweighting) at initialisation.
    ``forward`` returns ``log m`` (B, C).
    """

    def __init__(self, num_classes: int, hidden: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.num_classes, self.hidden = int(num_classes), int(hidden)
        self.mlp = nn.Sequential(nn.Linear(num_classes, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.class_keys = nn.Parameter(torch.empty(num_classes, hidden))
        with torch.no_grad():
            first = self.mlp[0]
            bound = 1.0 / math.sqrt(num_classes)
            first.weight.uniform_(-bound, bound, generator=generator)
            first.bias.uniform_(-bound, bound, generator=generator)
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
            self.class_keys.normal_(0.0, 1.0, generator=generator)

    def forward(self, teacher_logits: Tensor) -> Tensor:
        q = self.mlp(F.log_softmax(teacher_logits.float(), dim=-1))
        scores = q @ self.class_keys.t() / math.sqrt(self.hidden)
        return F.log_softmax(scores, dim=-1) + math.log(self.num_classes)


class AKDDistiller(Distiller):
    """Gap-weighted CE/KD with a context-aware teacher target (see the module docstring)."""

    params: AKDParams

    def __init__(self, *args: Any, num_classes: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.distill:
            raise ValueError("AKD needs a teacher and an enabled schedule")
        assert self.teacher is not None
        self.params = self.params if self.params is not None else AKDParams()
        classes = num_classes if num_classes is not None else classifier_of(self.teacher).out_features
        self.cam = ContextAwareModule(classes, self.params.cam_hidden, generator=self._init_rng)

    def method_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.cam.parameters()

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        return super().param_groups(base_lr) + [{"params": list(self.cam.parameters()), "lr": base_lr, "name": "cam"}]

    def method_objective(self, batch: Batch) -> Objective:
        assert batch.teacher_logits is not None
        T = self.losses_cfg.temperature
        with torch.autocast(device_type=batch.student_logits.device.type, enabled=False):
            zs, zt = batch.student_logits.float(), batch.teacher_logits.float()
            with torch.no_grad():
                gap = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")
                if self.distributed:  # the gap of the global batch (equal local batches: the mean of theirs)
                    gap = distributed.mean_over_ranks(gap)
                alpha = 1.0 - torch.exp(-self.params.beta * gap)
            log_m = self.cam(zt)
            # CAM objective at T = 1, gradient into the CAM only
            cam_ce = F.cross_entropy(log_m + F.log_softmax(zt, -1), batch.y)
            objective = Objective(ce_scale=alpha, term_scales={"kd": 1.0 - alpha}, auxiliary={"cam": cam_ce},
                                  metrics={"alpha": alpha, "cam": cam_ce.detach()})
            if self.use_kd:
                target = F.log_softmax(log_m.detach() + F.log_softmax(zt / T, -1), dim=-1)
                objective.terms["kd"] = F.kl_div(F.log_softmax(zs / T, -1), target, log_target=True,
                                                 reduction="batchmean") * (T * T)
        return objective


SPEC = MethodSpec("akd", "AKD: gap-based alpha (CE vs KD) + context-aware teacher reweighting", params=AKDParams,
                  schedule=lambda *_: ConstantSchedule(a=1.0), distiller=AKDDistiller, terms=("kd",),
                  metrics=("alpha", "cam"), objective="alpha CE + (1 - alpha) KD(CAM-reweighted teacher) + CAM loss")
