"""AKD (Li, arXiv 2509.05319): gap-adaptive CE/KD balance + context-aware teacher reweighting.

Our reading (formula, CAM architecture and hyper-parameters are not public):

* gap-based balance (``alpha: gap``, the default), per batch, detached (a schedule-like weight, not trained)::

      alpha = 1 - exp(-beta * KL_batch(softmax(z_t) || softmax(z_s)))      (T = 1, batch mean)

  a large teacher-student gap puts the weight on the hard labels, a small one on the teacher. The paper's
  other variant, a learnable alpha (``alpha: learned``): ``alpha = sigmoid(theta)``, one scalar trained with
  the student on the same objective (its own parameter group, no weight decay, starting at alpha = 0.5). Its
  gradient is ``total_weight * alpha (1 - alpha) (CE - KD~)``: it moves the weight toward the smaller of the
  two losses, which is what "learned" means here and can run to either end.
* CAM (:class:`ContextAwareModule`): ``log p~_t = normalise(log m + log_softmax(z_t / T))``, i.e.
  ``p~_t = normalize(m * p_t^T)``, the teacher's tempered distribution reweighted per class.
* objective::

      KD~   = T^2 * KL(p~_t || softmax(z_s / T))            (p~_t detached: the student cannot move its target)
      CAM   = CE(normalize(m * softmax(z_t / T)), y)         (trains the CAM only; teacher logits are detached)
      total = ce_weight * s * alpha * CE + s * (1 - alpha) * KD~ + CAM          (s = total_weight)

  The schedule is constant 1: alpha does the balancing. ``total_weight`` (s, default 2) sets the sum of the CE
  and KD weights: 2 is what Hinton KD (``kd``: CE + 1 * KD) puts on them, so AKD and ``kd`` train at the same
  overall loss scale and differ only in the balance; s = 1 is the paper's convex form ``alpha CE + (1 - alpha)
  KD``, half of ``kd``'s scale (until 2026-12 the only form, which confounded the balance with the scale).
  The CAM is trained at the temperature T it is applied at (until 2026-12 it was trained at T = 1 and applied
  to the tempered teacher). Its weights ``m`` lie in (0, C) (C = classes: up to 10x on CIFAR-10), bounded by
  the softmax; nothing else limits them. The CAM is *not* trained on the KD loss: jointly minimising
  KD over the target would collapse ``p~_t`` onto the student's prediction. Its own objective makes the
  reweighted teacher a better predictor of the label in context (correcting systematic teacher confusions);
  its last layer starts at zero so the run begins as plain gap-weighted KD. Known risk: CE also rewards
  sharpening ``p~_t``, which thins the dark knowledge; ``m`` is bounded by ``C``. With several processes the
  gap is that of the global batch (the mean over the ranks' equal batches).

Reported: ``alpha`` and ``cam`` (the CAM's CE).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Literal, Optional

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
    alpha: Literal["gap", "learned"] = Field(
        "gap", description="gap: alpha = 1 - exp(-beta * KL) per batch; learned: alpha = sigmoid(theta), trained")
    total_weight: float = Field(
        2.0, gt=0.0, le=100.0, description="the sum of the CE and KD weights: 2 = kd's CE + 1 KD; 1 = the paper's "
                                           "convex alpha CE + (1 - alpha) KD")


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
        # the learnable variant's alpha = sigmoid(alpha_logit), 0.5 at the start
        self.alpha_logit = nn.Parameter(torch.zeros(())) if self.params.alpha == "learned" else None

    def method_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.cam.parameters()
        if self.alpha_logit is not None:
            yield self.alpha_logit

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        groups = super().param_groups(base_lr) + [{"params": list(self.cam.parameters()), "lr": base_lr, "name": "cam"}]
        if self.alpha_logit is not None:
            groups.append({"params": [self.alpha_logit], "lr": base_lr, "weight_decay": 0.0, "name": "akd_alpha"})
        return groups

    def _alpha(self, zs: Tensor, zt: Tensor) -> Tensor:
        if self.alpha_logit is not None:
            return torch.sigmoid(self.alpha_logit.float())
        with torch.no_grad():
            gap = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")
            if self.distributed:  # the gap of the global batch (equal local batches: the mean of theirs)
                gap = distributed.mean_over_ranks(gap)
            return 1.0 - torch.exp(-self.params.beta * gap)

    def method_objective(self, batch: Batch) -> Objective:
        assert batch.teacher_logits is not None
        T = self.losses_cfg.temperature
        with torch.autocast(device_type=batch.student_logits.device.type, enabled=False):
            zs, zt = batch.student_logits.float(), batch.teacher_logits.float()
            alpha, s = self._alpha(zs.detach(), zt), self.params.total_weight
            log_m = self.cam(zt)
            # CAM objective at the temperature its reweighting is applied at; gradient into the CAM only
            tempered = F.log_softmax(zt / T, -1)
            cam_ce = F.cross_entropy(log_m + tempered, batch.y)
            objective = Objective(ce_scale=s * alpha, term_scales={"kd": s * (1.0 - alpha)}, auxiliary={"cam": cam_ce},
                                  metrics={"alpha": alpha.detach(), "cam": cam_ce.detach()})
            if self.use_kd:
                target = F.log_softmax(log_m.detach() + tempered, dim=-1)
                objective.terms["kd"] = F.kl_div(F.log_softmax(zs / T, -1), target, log_target=True,
                                                 reduction="batchmean") * (T * T)
        return objective


SPEC = MethodSpec("akd", "AKD: gap-based alpha (CE vs KD) + context-aware teacher reweighting", params=AKDParams,
                  schedule=lambda *_: ConstantSchedule(a=1.0), distiller=AKDDistiller, terms=("kd",),
                  metrics=("alpha", "cam"), objective="{total_weight:g} * [alpha CE + (1 - alpha) KD(CAM-reweighted teacher)] + CAM loss"
                            " (alpha: {alpha})")
