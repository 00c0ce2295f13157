"""CES-KD: curriculum-based expert selection (Amara et al., arXiv 2209.07606), as we read it.

The paper publishes no code; what it says: a ladder of teacher assistants (TAs) of decreasing capacity, and
*one teacher per input image* chosen by how hard the image is, on the hypothesis that a student learns easy
images better from a low-capacity teacher and hard ones from a high-capacity one, taught gradually.

Our reading, fully vectorised (no per-sample Python):

- The ladder is ``assistants`` (smallest first; each trained alone with CE on the student's budget when the
  method is built) followed by the main teacher: K experts in all. Built inside a run, the ladder must not fall:
  no expert's validation accuracy above the next one's, else the run stops with one line (an assistant
  that beats the teacher makes "a larger expert for harder images" meaningless).
- Difficulty of each image = the main teacher's cross-entropy on it (detached). Its rank ``r`` in [0, 1)
  (0 = easiest) is taken against a *reference*: the difficulties of the last 4,096 training images seen
  before this batch (``routing: reference``, the default), so an image's expert depends on the image (and the
  run so far), not on which images share its batch; the first batch, with no reference yet, is ranked within
  itself. With several processes every rank adds the global batch (gathered) to the same reference.
  ``routing: batch`` is the earlier reading (before 2026-12): the rank within the batch, which hands each
  expert a fixed share of every batch whatever its images.
- Curriculum pacing: at progress p the top of the ladder that is open is
  ``u(p) = min(1, 1/K + (1 - 1/K) * p / pace)``: at the start every image learns from the smallest assistant;
  by ``p = pace`` the whole ladder is open and images spread over it by difficulty.
- Expert of an image: ``k = min(K - 1, floor(r * u(p) * K))``; its logits replace the teacher's in the KD
  term: ``CE + a * KD(expert)``.
- The weight is constant (``method.ces_kd.a``). Reported: ``expert_level``, the batch's mean k / (K - 1).

Cost: one extra frozen forward per assistant per step (no grad).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from gkd_core import distributed
from gkd_core.losses import kd_loss
from gkd_core.methods.base import Batch, Distiller, MethodContext, MethodSpec, Objective
from gkd_core.methods.spec import MethodSetupError
from gkd_core.schedules import ConstantSchedule
from gkd_core.sections import ModelConfig, Strict


class CESKDParams(Strict):
    """CES-KD: per-image expert from a ladder of teacher assistants (smallest first) + the teacher."""

    a: float = Field(1.0, ge=0.0, le=100.0, description="constant distillation weight")
    assistants: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name="digits_cnn", width=1.0)],
        min_length=1, max_length=8, description="teacher assistants, smallest first (trained with CE first)",
    )
    pace: float = Field(0.5, gt=0.0, le=1.0, description="fraction of training by which the whole ladder is open")
    routing: Literal["reference", "batch"] = Field(
        "reference", description="reference: rank each image's difficulty against the last 4,096 images seen; "
                                 "batch: rank within its batch (a fixed share of every batch per expert)")


REFERENCE_SIZE = 4096  # difficulties of the most recent training images, the ranks' reference


def expert_index(difficulty: Tensor, progress: float, n_experts: int, pace: float,
                 reference: Optional[Tensor] = None) -> Tensor:
    """Per-sample expert index in ``[0, n_experts)``: harder images (higher ``difficulty``) get larger
    experts, and the ladder opens from the smallest expert to all of them by ``progress == pace``. An image's
    rank is the fraction of ``reference`` (other images' difficulties) strictly below its own; without a
    reference, of its batch (ties share a rank)."""
    ref = difficulty if reference is None or reference.numel() == 0 else reference
    ordered = ref.detach().float().sort().values
    rank = torch.searchsorted(ordered, difficulty.detach().float().contiguous()).to(torch.float32) / ordered.numel()
    top = min(1.0, 1.0 / n_experts + (1.0 - 1.0 / n_experts) * progress / pace)
    return (rank * top * n_experts).floor().long().clamp_(max=n_experts - 1)


def check_ladder(rungs: Sequence[tuple[str, float]]) -> None:
    """Refuse an inverted ladder in one line: no expert (smallest first, the teacher last) may reach a higher
    validation accuracy than the one above it, or the curriculum is not the test it is meant to be."""
    for (low, low_acc), (high, high_acc) in zip(rungs, rungs[1:]):
        if low_acc > high_acc:
            raise MethodSetupError(f"CES-KD's ladder is inverted: {low} reaches validation accuracy {low_acc:.4f}, above "
                             f"{high}'s {high_acc:.4f}; use smaller assistants (method.ces_kd.assistants) or a "
                             "better-trained teacher")


class CESKDDistiller(Distiller):
    """Per-image expert selection over ``assistants + [teacher]`` for the KD term (see the module docstring)."""

    params: CESKDParams

    def __init__(self, *args: Any, assistants: Sequence[nn.Module] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params = self.params if self.params is not None else CESKDParams()
        if self.distill and not assistants:
            raise ValueError("CES-KD needs at least one teacher assistant (method.ces_kd.assistants)")
        self.assistants = nn.ModuleList(assistants)
        for a in self.assistants:
            a.eval()
            for p in a.parameters():
                p.requires_grad_(False)
        # the routing reference: a ring of recent difficulties and how many were written (checkpointed)
        self.register_buffer("reference", torch.zeros(REFERENCE_SIZE))
        self.register_buffer("reference_seen", torch.zeros((), dtype=torch.long))

    def _reference(self) -> Optional[Tensor]:
        n = int(self.reference_seen)
        return self.reference[:min(n, REFERENCE_SIZE)] if n else None

    def _remember(self, difficulty: Tensor) -> None:
        d = difficulty.detach().float()[-REFERENCE_SIZE:]
        start = int(self.reference_seen) % REFERENCE_SIZE
        slots = (torch.arange(d.numel(), device=d.device) + start) % REFERENCE_SIZE
        self.reference[slots.to(self.reference.device)] = d.to(self.reference.device)
        self.reference_seen += difficulty.numel()

    @classmethod
    def from_context(cls, spec: MethodSpec, ctx: MethodContext) -> "CESKDDistiller":
        params = ctx.params if isinstance(ctx.params, CESKDParams) else CESKDParams()
        if ctx.train_alone is None:
            raise ValueError("CES-KD trains its teacher assistants first: the context needs train_alone")
        assistants = [ctx.train_alone(m, f"assistant[{i}]") for i, m in enumerate(params.assistants)]
        if ctx.val_accuracy is not None and ctx.teacher is not None:
            check_ladder([(f"assistant[{i}] ({m.name} x{m.width:g})", ctx.val_accuracy(a))
                          for i, (m, a) in enumerate(zip(params.assistants, assistants))] +
                         [("the teacher", ctx.val_accuracy(ctx.teacher))])
        return cls(ctx.student, ctx.teacher, ctx.schedule, ctx.losses, terms=spec.terms, weights=ctx.weights,
                   metrics=spec.metrics, params=params, label_smoothing=ctx.label_smoothing, seed=ctx.seed,
                   assistants=assistants)

    def frozen_modules(self) -> list[nn.Module]:
        return super().frozen_modules() + list(self.assistants)

    def method_objective(self, batch: Batch) -> Objective:
        if not self.use_kd:
            return Objective()
        t_logits = batch.teacher_logits
        assert t_logits is not None
        with torch.no_grad():
            assistant_logits = torch.stack([a(batch.x) for a in self.assistants])
        experts = torch.cat([assistant_logits.to(t_logits.dtype), t_logits.unsqueeze(0)])  # (K, B, C)
        with torch.autocast(device_type=batch.student_logits.device.type, enabled=False):
            difficulty = nn.functional.cross_entropy(t_logits.float(), batch.y, reduction="none")
        everyone = distributed.gather_rows(difficulty) if self.distributed else difficulty  # the global batch
        if self.params.routing == "batch":  # ranks within the global batch; this rank's block
            b = difficulty.shape[0]
            ranked = expert_index(everyone, batch.progress, experts.shape[0], self.params.pace)
            k = ranked[distributed.rank() * b:(distributed.rank() + 1) * b] if self.distributed else ranked
        else:
            k = expert_index(difficulty, batch.progress, experts.shape[0], self.params.pace, self._reference())
            if self.training:
                self._remember(everyone)
        chosen = experts[k, torch.arange(k.shape[0], device=k.device)]
        level = k.float().mean() / max(experts.shape[0] - 1, 1)
        return Objective(terms={"kd": kd_loss(batch.student_logits, chosen, self.losses_cfg.temperature)},
                         metrics={"expert_level": level.detach()})


SPEC = MethodSpec("ces_kd", "CES-KD: per-image expert from a teacher-assistant ladder, opened by a curriculum",
                  params=CESKDParams, schedule=lambda p, _: ConstantSchedule(a=p.a), distiller=CESKDDistiller,
                  terms=("kd",), metrics=("expert_level",), objective="CE + {w} * [KD(per-image expert)]")
