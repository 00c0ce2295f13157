"""The training objective as an ``nn.Module``: student, frozen teacher, schedule, losses.

``Distiller.forward(x, y, progress, step)`` returns a dict of 0-dim float32 tensors ``ce``, ``kd``,
``wasserstein``, ``grad_match``, ``weight`` and ``total`` (the loss to backward), plus ``logits`` (the
student's, for metrics) and, for the peers, ``entropy_scale`` (DynamicKD) or ``alpha`` and ``cam`` (AKD):

    total = ce_weight * CE + w(p) * (kd_weight * KD + wasserstein_weight * W + grad_match_weight * GM)

with ``w(p) = schedule.weight(progress)``. Terms whose weight is 0 are not computed (reported as 0); with a
disabled schedule (method ``none``) or no teacher, the teacher is never called and all distillation terms are
0. Hot-path decisions depend only on Python values (config, ``progress``, ``step``), never on tensor values,
so a CUDA step issues no host synchronisation (exact EMD excepted, see :mod:`gkd_core.losses`).

The teacher is frozen: ``eval()`` always (``Distiller.train()`` keeps it in eval), ``requires_grad=False``,
run under ``torch.no_grad`` (not ``inference_mode``: its logits are saved for the KD backward, which inference
tensors forbid) except on input-gradient-matching steps, where it runs with grad enabled so its *input*
gradient can be taken (its parameters still get none). On those steps a ``torch.compile``'d student runs
eagerly (``torch.compiler.set_stance("force_eager")``), because compiled graphs do not support the double
backward; the other steps use the compiled graph.

Cached teacher (``runtime.cache_teacher``, augmentation off): :func:`compute_teacher_cache` runs the teacher
once over the training split (batched, ``inference_mode``, bf16 autocast on CUDA) and keeps its logits and
penultimate features on the device; after :meth:`Distiller.attach_teacher_cache`, ``forward(..., index=idx)``
(the training loader's sample indices) reads them instead of calling the teacher. Input-gradient matching
needs the teacher's input gradient and refuses a cache.

Peers (our readings of papers without public code; see each class): :class:`DynamicKDDistiller`,
:class:`AKDDistiller`, :class:`CESKDDistiller`. ``DISTILLERS`` maps names to classes; :func:`build_distiller` picks one from the
method config.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkd_core.config import AKDParams, CESKDParams, DynamicKDParams, LossesConfig, MethodConfig
from gkd_core.losses import (
    FeatureProjector,
    input_gradient_matching,
    kd_loss,
    logit_gradient_matching,
    wasserstein_distance,
)
from gkd_core.models import FeatureHook, classifier_of
from gkd_core.schedules import Schedule

logger = logging.getLogger(__name__)

__all__ = [
    "Distiller", "DynamicKDDistiller", "AKDDistiller", "CESKDDistiller", "ContextAwareModule", "DISTILLERS",
    "build_distiller", "expert_index",
    "TeacherCache", "compute_teacher_cache",
]

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant: spreads (seed, step) over the seed space


def _step_seed(seed: int, step: int) -> int:
    """A generator seed that depends only on (seed, step): resumed runs draw the same sliced directions."""
    return (int(seed) * _SEED_MIX + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def _eager_if_compiled() -> contextlib.AbstractContextManager[Any]:
    """Run ``torch.compile``'d modules eagerly (compiled graphs do not support double backward).

    Nothing can have been compiled before ``torch._dynamo`` is imported, so then no context is needed (and
    importing it, which takes seconds, is avoided).
    """
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def _seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


@dataclass
class TeacherCache:
    """The frozen teacher's outputs on the (unaugmented) training split, row ``i`` = training image ``i``.

    ``logits`` ``(N, C)`` and ``features`` ``(N, D)`` (penultimate, or None when not needed) on the training
    device, in the dtype the teacher produced them (bf16 under CUDA autocast: exactly what an online teacher
    forward would hand the losses).
    """

    logits: Tensor
    features: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logits, self.features) if t is not None)


def compute_teacher_cache(
    teacher: nn.Module,
    x_uint8: Tensor,
    mean: Tensor,
    std: Tensor,
    device: torch.device | str,
    *,
    batch_size: int = 512,
    amp: bool = True,
    channels_last: bool = False,
    features: bool = True,
) -> TeacherCache:
    """Run ``teacher`` once over uint8 NCHW images ``x_uint8`` (normalised exactly as the loaders do, no
    augmentation), in batches of ``batch_size`` under ``torch.inference_mode`` (bf16 autocast on CUDA when
    ``amp``); keep logits and, with ``features``, the penultimate features on ``device``.

    The images may live on the host or on ``device``; only one batch at a time is moved. The teacher is put in
    eval mode and must already be on ``device``.
    """
    from gkd_core.data import normalise  # local: data is a sibling layer; keep this module's imports light

    device = torch.device(device)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise ValueError(f"x_uint8 must be a uint8 NCHW tensor, got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    c = x_uint8.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1).to(device)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, c, 1, 1).to(device)
    teacher.eval()
    hook = FeatureHook(teacher) if features else None
    logits, feats = [], []
    t0 = time.perf_counter()
    try:
        for lo in range(0, x_uint8.shape[0], batch_size):
            xb = normalise(x_uint8[lo : lo + batch_size].to(device, non_blocking=True), m, s)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=amp and device.type == "cuda"):
                logits.append(teacher(xb))
                if hook is not None:
                    assert hook.features is not None
                    feats.append(hook.features.flatten(1))
    finally:
        if hook is not None:
            hook.remove()
    # cat outside inference mode: the cache rows are ordinary tensors (the KD backward may save them)
    cache = TeacherCache(torch.cat(logits), torch.cat(feats) if feats else None)
    logger.info("teacher cache: %d images, %.1f MB on %s in %.1f s", len(cache), cache.nbytes / 2**20, device,
                time.perf_counter() - t0)
    return cache


class Distiller(nn.Module):
    """Student + frozen teacher + schedule + losses: the objective of every method (see module docstring).

    Args:
        student: the network to train (classifier attribute per the models contract).
        teacher: frozen teacher, or ``None`` to train the student alone.
        schedule: ``w(p)``; a schedule with ``enabled == False`` (``NoSchedule``) turns distillation off.
        losses_cfg: term weights, temperature, Wasserstein and gradient-matching settings.
        label_smoothing: passed to the CE term (not to KD or gradient matching).
        seed: drives the projector's initialisation and the sliced-Wasserstein directions
            (directions at step ``s`` depend only on ``(seed, s)``).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module],
        schedule: Schedule,
        losses_cfg: Optional[LossesConfig] = None,
        *,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.schedule = schedule
        self.losses_cfg = losses_cfg if losses_cfg is not None else LossesConfig()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._init_rng = _seeded_generator(self.seed)

        cfg = self.losses_cfg
        self.distill = teacher is not None and schedule.enabled
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.use_kd = self.distill and cfg.kd_weight > 0
        self.use_wasserstein = self.distill and cfg.wasserstein_weight > 0
        self.use_grad_match = self.distill and cfg.grad_match_weight > 0

        self.projector: Optional[FeatureProjector] = None
        self._teacher_cache: Optional[TeacherCache] = None  # not a buffer: never checkpointed
        self._student_hook: Optional[FeatureHook] = None
        self._teacher_hook: Optional[FeatureHook] = None
        if self.use_wasserstein:
            assert teacher is not None
            self._student_hook = FeatureHook(student)
            self._teacher_hook = FeatureHook(teacher)
            ds, dt = self._feature_dim(student), self._feature_dim(teacher)
            if ds != dt:
                self.projector = FeatureProjector(ds, dt, generator=self._init_rng)
                logger.info("feature widths differ (student %d, teacher %d): learned projector added", ds, dt)
        logger.info(
            "%s: distill=%s kd=%s wasserstein=%s grad_match=%s (%s, every %d)",
            type(self).__name__, self.distill, self.use_kd, self.use_wasserstein, self.use_grad_match,
            cfg.grad_match.variant, cfg.grad_match.every,
        )

    # --- structure ----------------------------------------------------------------------------------

    @staticmethod
    def _feature_dim(model: nn.Module) -> int:
        """Penultimate width: ``model.feature_dim`` if set, else the classifier's ``in_features``."""
        dim = getattr(getattr(model, "_orig_mod", model), "feature_dim", None)
        return int(dim) if dim is not None else classifier_of(model).in_features

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def remove_hooks(self) -> None:
        """Detach the feature hooks from the student and teacher (idempotent), e.g. before exporting the
        student on its own; the Wasserstein term cannot be computed afterwards."""
        for hook in (self._student_hook, self._teacher_hook):
            if hook is not None:
                hook.remove()
        self._student_hook = self._teacher_hook = None
        self.use_wasserstein = False

    def attach_teacher_cache(self, cache: Optional[TeacherCache]) -> None:
        """Use precomputed teacher outputs (see :func:`compute_teacher_cache`) whenever ``forward`` gets
        ``index``; ``None`` detaches. Refused with input-gradient matching (the teacher's input gradient
        cannot be cached) and when the Wasserstein term is on but the cache has no features."""
        if cache is not None:
            if not self.distill:
                raise ValueError("a teacher cache needs a teacher and an enabled schedule (nothing to distil)")
            if self.use_grad_match and self.losses_cfg.grad_match.variant == "input":
                raise ValueError(
                    "cannot cache the teacher with input-gradient matching: it needs the teacher's input "
                    "gradient on every matched step (use grad_match.variant 'logit' or grad_match_weight 0)"
                )
            if self.use_wasserstein and cache.features is None:
                raise ValueError("the Wasserstein term needs teacher features: compute the cache with features=True")
        self._teacher_cache = cache

    @property
    def teacher_cache(self) -> Optional[TeacherCache]:
        return self._teacher_cache

    def method_parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters that belong to the method itself (none for the standard objective)."""
        return iter(())

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student, projector and method-specific parameters (never the teacher's)."""
        yield from (p for p in self.student.parameters() if p.requires_grad)
        if self.projector is not None:
            yield from self.projector.parameters()
        yield from self.method_parameters()

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: student + projector at ``base_lr`` (subclasses add their own)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.projector is not None:
            params += list(self.projector.parameters())
        return [{"params": params, "lr": base_lr, "name": "student"}]

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
        gen.manual_seed(_step_seed(self.seed, step))
        return gen

    # --- forward ------------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, y: Tensor, progress: float, step: int = 0, index: Optional[Tensor] = None
    ) -> dict[str, Tensor]:
        """The objective on one batch. ``index`` (the batch's training-split row numbers) lets an attached
        teacher cache replace the teacher forward; without a cache it is ignored."""
        cfg = self.losses_cfg
        w = float(self.schedule.weight(progress))
        device = x.device
        zero = torch.zeros((), dtype=torch.float32, device=device)

        gm_now = self.use_grad_match and step % cfg.grad_match.every == 0
        # input-gradient matching needs graphs; under no_grad (evaluation) it is reported as 0
        input_gm = gm_now and cfg.grad_match.variant == "input" and torch.is_grad_enabled()
        x_in = x.detach().requires_grad_(True) if input_gm else x

        with _eager_if_compiled() if input_gm else contextlib.nullcontext():
            s_logits = self.student(x_in)
        with torch.autocast(device_type=device.type, enabled=False):
            ce = F.cross_entropy(s_logits.float(), y, label_smoothing=self.label_smoothing)

        wass = gm = zero
        t_logits: Optional[Tensor] = None
        if self.distill:
            assert self.teacher is not None
            cache = self._teacher_cache if index is not None and not input_gm else None
            ft: Optional[Tensor] = None
            if cache is not None:
                assert index is not None
                t_logits = cache.logits.index_select(0, index)
                if self.use_wasserstein and cache.features is not None:
                    ft = cache.features.index_select(0, index)
            elif input_gm:
                with torch.enable_grad():
                    t_logits = self.teacher(x_in)
            else:
                with torch.no_grad():
                    t_logits = self.teacher(x)
            if self.use_wasserstein:
                assert self._student_hook is not None and self._teacher_hook is not None
                fs = self._student_hook.features
                if ft is None:
                    ft = self._teacher_hook.features
                assert fs is not None and ft is not None
                fs, ft = fs.flatten(1), ft.detach().flatten(1)
                if self.projector is not None:
                    fs = self.projector(fs)
                wc = cfg.wasserstein
                wass = wasserstein_distance(
                    fs, ft, method=wc.method, n_projections=wc.n_projections, sinkhorn_reg=wc.sinkhorn_reg,
                    sinkhorn_iters=wc.sinkhorn_iters, normalize=wc.normalize_features,
                    generator=self._generator(device, step) if wc.method == "sliced" else None,
                )
            if input_gm:
                gm = input_gradient_matching(self.student, self.teacher, x_in, y, s_logits, t_logits)
            elif gm_now and cfg.grad_match.variant == "logit":
                gm = logit_gradient_matching(s_logits, t_logits.detach(), y)
            t_logits = t_logits.detach()

        out: dict[str, Tensor] = {
            "ce": ce,
            "wasserstein": wass,
            "grad_match": gm,
            "weight": torch.full((), w, dtype=torch.float32, device=device),
            "logits": s_logits,
        }
        out.update(self._objective(out, s_logits, t_logits, y, w))
        return out

    def _objective(
        self, parts: dict[str, Tensor], s_logits: Tensor, t_logits: Optional[Tensor], y: Tensor, w: float
    ) -> dict[str, Tensor]:
        """``kd`` and ``total`` from the shared parts (CE, W, GM); subclasses change the KD block."""
        cfg = self.losses_cfg
        kd = parts["ce"].new_zeros(())
        if self.use_kd:
            assert t_logits is not None
            kd = kd_loss(s_logits, t_logits, cfg.temperature)
        total = cfg.ce_weight * parts["ce"]
        if self.distill:
            total = total + w * (
                cfg.kd_weight * kd + cfg.wasserstein_weight * parts["wasserstein"]
                + cfg.grad_match_weight * parts["grad_match"]
            )
        return {"kd": kd, "total": total}


class DynamicKDDistiller(Distiller):
    """DynamicKD (Zhu et al., arXiv 2305.05233): a learnable entropy controller on the student's KD logits.

    Our reading (the paper's exact update rule is unpublished): a positive scalar ``c = exp(log_c)``,
    initialised to 1, multiplies the student logits *inside the KD term only*::

        KD_c = T^2 * KL(softmax(z_t / T) || softmax(c * z_s / T))
        total = ce_weight * CE(z_s, y) + w * (kd_weight * KD_c + l_w * W + l_g * GM)

    ``c`` acts as a student-side inverse temperature: it corrects the student's output entropy toward the
    teacher's. CE (and every other term) sees the raw logits, so ``c`` gets gradient *only* from the KD term
    (``d total / d log_c = w * kd_weight * d KD_c / d log_c``), which is the paper's "controller updated by the
    distillation loss"; the student's gradient is that of the same objective with ``c`` held at its current
    value. ``log_c`` parameterises positivity; it trains with the student's optimizer in its own parameter
    group (lr ``controller_lr_scale * base_lr``, no weight decay). The schedule is constant (``a``).
    Logged: ``entropy_scale`` = ``c``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        schedule: Schedule,
        losses_cfg: Optional[LossesConfig] = None,
        params: Optional[DynamicKDParams] = None,
        *,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(student, teacher, schedule, losses_cfg, label_smoothing=label_smoothing, seed=seed)
        if not self.distill:
            raise ValueError("DynamicKD needs a teacher and an enabled schedule")
        self.params = params if params is not None else DynamicKDParams()
        if not self.use_kd:
            logger.warning("DynamicKD with kd_weight = 0: the entropy controller receives no gradient")
        self.log_c = nn.Parameter(torch.zeros(()))

    @property
    def entropy_scale(self) -> Tensor:
        return self.log_c.exp()

    def method_parameters(self) -> Iterator[nn.Parameter]:
        yield self.log_c

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        return super().param_groups(base_lr) + [
            {"params": [self.log_c], "lr": base_lr * self.params.controller_lr_scale, "weight_decay": 0.0,
             "name": "entropy_controller"}
        ]

    def _objective(
        self, parts: dict[str, Tensor], s_logits: Tensor, t_logits: Optional[Tensor], y: Tensor, w: float
    ) -> dict[str, Tensor]:
        cfg = self.losses_cfg
        c = self.log_c.float().exp()
        kd = parts["ce"].new_zeros(())
        if self.use_kd:
            assert t_logits is not None
            kd = kd_loss(c * s_logits.float(), t_logits, cfg.temperature)
        total = cfg.ce_weight * parts["ce"] + w * (
            cfg.kd_weight * kd + cfg.wasserstein_weight * parts["wasserstein"]
            + cfg.grad_match_weight * parts["grad_match"]
        )
        return {"kd": kd, "total": total, "entropy_scale": c.detach()}


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
          total = ce_weight * alpha * CE + w * ((1 - alpha) * kd_weight * KD~ + l_w * W + l_g * GM) + CAM

      with ``w = 1`` (AKD's schedule is constant 1). The CAM is *not* trained on the KD loss: jointly
      minimising KD over the target would collapse ``p~_t`` onto the student's prediction. Its own objective
      makes the reweighted teacher a better predictor of the label in context (correcting systematic teacher
      confusions); its last layer starts at zero so the run begins as plain gap-weighted KD. Known risk: CE
      also rewards sharpening ``p~_t``, which thins the dark knowledge; ``m`` is bounded by ``C``.

    Logged: ``alpha`` and ``cam`` (the CAM's CE).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        schedule: Schedule,
        losses_cfg: Optional[LossesConfig] = None,
        params: Optional[AKDParams] = None,
        *,
        num_classes: Optional[int] = None,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(student, teacher, schedule, losses_cfg, label_smoothing=label_smoothing, seed=seed)
        if not self.distill:
            raise ValueError("AKD needs a teacher and an enabled schedule")
        self.params = params if params is not None else AKDParams()
        classes = num_classes if num_classes is not None else classifier_of(teacher).out_features
        self.cam = ContextAwareModule(classes, self.params.cam_hidden, generator=self._init_rng)

    def method_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.cam.parameters()

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        return super().param_groups(base_lr) + [{"params": list(self.cam.parameters()), "lr": base_lr, "name": "cam"}]

    def _objective(
        self, parts: dict[str, Tensor], s_logits: Tensor, t_logits: Optional[Tensor], y: Tensor, w: float
    ) -> dict[str, Tensor]:
        assert t_logits is not None
        cfg = self.losses_cfg
        T = cfg.temperature
        with torch.autocast(device_type=s_logits.device.type, enabled=False):
            zs, zt = s_logits.float(), t_logits.float()
            with torch.no_grad():
                gap = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")
                alpha = 1.0 - torch.exp(-self.params.beta * gap)
            log_m = self.cam(zt)
            # CAM objective at T = 1, gradient into the CAM only
            cam_ce = F.cross_entropy(log_m + F.log_softmax(zt, -1), y)
            kd = parts["ce"].new_zeros(())
            if self.use_kd:
                target = F.log_softmax(log_m.detach() + F.log_softmax(zt / T, -1), dim=-1)
                kd = F.kl_div(F.log_softmax(zs / T, -1), target, log_target=True, reduction="batchmean") * (T * T)
        total = cfg.ce_weight * alpha * parts["ce"] + w * (
            (1.0 - alpha) * cfg.kd_weight * kd + cfg.wasserstein_weight * parts["wasserstein"]
            + cfg.grad_match_weight * parts["grad_match"]
        ) + cam_ce
        return {"kd": kd, "total": total, "alpha": alpha, "cam": cam_ce}


# --- CES-KD --------------------------------------------------------------------------------------
# CES-KD: curriculum-based expert selection (Amara et al., arXiv 2209.07606), as we read it.
#
# The paper publishes no code; what it says: a ladder of teacher assistants (TAs) of decreasing capacity, and
# *one teacher per input image* chosen by how hard the image is, on the hypothesis that a student learns easy
# images better from a low-capacity teacher and hard ones from a high-capacity one, taught gradually.
#
# Our reading, fully vectorised (no per-sample Python):
#
# - The ladder is ``assistants`` (smallest first) followed by the main teacher: K experts in all.
# - Difficulty of each image = the main teacher's cross-entropy on it (detached); its rank within the batch
#   gives ``r`` in [0, 1) (0 = easiest).
# - Curriculum pacing: at progress p the top of the ladder that is open is
#   ``u(p) = min(1, 1/K + (1 - 1/K) * p / pace)``: at the start every image learns from the smallest assistant;
#   by ``p = pace`` the whole ladder is open and images spread over it by difficulty.
# - Expert of an image: ``k = min(K - 1, floor(r * u(p) * K))``; its logits replace the teacher's in the KD
#   term. Wasserstein and gradient matching keep using the main teacher (its features and input gradient).
# - The weight w(p) is constant (``method.ces_kd.a``). Logged: ``expert_level``, the batch's mean k / (K - 1).
#
# Cost: one extra frozen forward per assistant per step (no grad).


def expert_index(difficulty: Tensor, progress: float, n_experts: int, pace: float) -> Tensor:
    """Per-sample expert index in ``[0, n_experts)``: harder images (higher ``difficulty``) get larger
    experts, and the ladder opens from the smallest expert to all of them by ``progress == pace``."""
    b = difficulty.shape[0]
    rank = difficulty.argsort().argsort().to(torch.float32) / max(b, 1)  # 0 = easiest
    top = min(1.0, 1.0 / n_experts + (1.0 - 1.0 / n_experts) * progress / pace)
    return (rank * top * n_experts).floor().long().clamp_(max=n_experts - 1)


class CESKDDistiller(Distiller):
    """Per-image expert selection over ``assistants + [teacher]`` for the KD term (see module docstring)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module],
        schedule: Schedule,
        losses_cfg: Optional[LossesConfig] = None,
        params: Optional[CESKDParams] = None,
        assistants: Sequence[nn.Module] = (),
        *,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(student, teacher, schedule, losses_cfg, label_smoothing=label_smoothing, seed=seed)
        self.params = params if params is not None else CESKDParams()
        if self.distill and not assistants:
            raise ValueError("CES-KD needs at least one teacher assistant (method.ces_kd.assistants)")
        self.assistants = nn.ModuleList(assistants)
        for a in self.assistants:
            a.eval()
            for p in a.parameters():
                p.requires_grad_(False)
        # (progress, assistant logits (K-1, B, C)) of the call in flight; None when KD is off
        self._call: Optional[tuple[float, Tensor]] = None

    def train(self, mode: bool = True) -> "CESKDDistiller":
        super().train(mode)
        for a in self.assistants:
            a.eval()
        return self

    def forward(self, x: Tensor, y: Tensor, progress: float, step: int = 0,
                index: Optional[Tensor] = None) -> dict[str, Tensor]:
        if self.use_kd:
            with torch.no_grad():
                self._call = (progress, torch.stack([a(x) for a in self.assistants]))
        try:
            return super().forward(x, y, progress, step, index)
        finally:
            self._call = None

    def _objective(self, parts: dict[str, Tensor], s_logits: Tensor, t_logits: Optional[Tensor], y: Tensor,
                   w: float) -> dict[str, Tensor]:
        if self._call is None or t_logits is None:  # no KD term: the standard objective
            return super()._objective(parts, s_logits, t_logits, y, w)
        progress, assistant_logits = self._call
        cfg = self.losses_cfg
        experts = torch.cat([assistant_logits.to(t_logits.dtype), t_logits.unsqueeze(0)])  # (K, B, C)
        with torch.autocast(device_type=s_logits.device.type, enabled=False):
            difficulty = nn.functional.cross_entropy(t_logits.float(), y, reduction="none")
        k = expert_index(difficulty, progress, experts.shape[0], self.params.pace)
        chosen = experts[k, torch.arange(k.shape[0], device=k.device)]
        kd = kd_loss(s_logits, chosen, cfg.temperature)
        total = cfg.ce_weight * parts["ce"] + w * (
            cfg.kd_weight * kd + cfg.wasserstein_weight * parts["wasserstein"]
            + cfg.grad_match_weight * parts["grad_match"]
        )
        level = k.float().mean() / max(experts.shape[0] - 1, 1)
        return {"kd": kd, "total": total, "expert_level": level.detach()}


DISTILLERS: dict[str, Callable[..., Distiller]] = {
    "standard": Distiller,
    "dynamic_kd": DynamicKDDistiller,
    "akd": AKDDistiller,
    "ces_kd": CESKDDistiller,
}


def build_distiller(
    method_cfg: MethodConfig,
    losses_cfg: LossesConfig,
    student: nn.Module,
    teacher: Optional[nn.Module],
    schedule: Schedule,
    *,
    label_smoothing: float = 0.0,
    seed: int = 0,
    assistants: Sequence[nn.Module] = (),
) -> Distiller:
    """The distiller for ``method_cfg.name``: the peers by name, every schedule-based method as ``standard``.
    ``assistants`` (trained, smallest first) are CES-KD's teacher-assistant ladder."""
    name = method_cfg.name
    if name == "ces_kd":
        if teacher is None:
            raise ValueError("method 'ces_kd' needs a teacher")
        return CESKDDistiller(student, teacher, schedule, losses_cfg, method_cfg.ces_kd, assistants,
                              label_smoothing=label_smoothing, seed=seed)
    if name in ("dynamic_kd", "akd"):
        if teacher is None:
            raise ValueError(f"method {name!r} needs a teacher")
        params = getattr(method_cfg, name)
        return DISTILLERS[name](student, teacher, schedule, losses_cfg, params,
                                label_smoothing=label_smoothing, seed=seed)
    if name != "none" and teacher is None:
        raise ValueError(f"method {name!r} needs a teacher (only method 'none' trains a model alone)")
    return DISTILLERS["standard"](student, teacher, schedule, losses_cfg, label_smoothing=label_smoothing, seed=seed)
