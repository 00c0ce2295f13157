"""What a distillation method is: its declaration (:class:`MethodSpec`), the shared forward (:class:`Distiller`)
and the one place the objective is summed (:func:`combine`).

A method declares, in one :class:`MethodSpec`: its parameter block in params.yaml (``method.<name>``), its
distillation-weight schedule w(p), the distillation terms it uses, the extra metrics it reports, and the
``nn.Module`` that computes it (a :class:`Distiller` or a subclass). The registry in
:mod:`gkd_core.methods` maps names to specs; nothing else dispatches on a method's name.

``Distiller.forward(x, y, progress, step, index=None)`` returns a dict of 0-dim float32 tensors: ``ce``,
every distillation term (``kd``, ``wasserstein``, ``grad_match``; 0 when off), ``weight`` (w(p)),
``total`` (the loss to backward), the method's extra metrics, plus ``logits`` (the student's):

    total = ce_weight * s_ce * CE + w(p) * sum_i(s_i * l_i * term_i) + sum(auxiliary losses)

``l_i`` are the term weights, ``s_ce``/``s_i`` per-batch scales a method may set (AKD's alpha; 1 otherwise);
:func:`combine` is that sum. A subclass changes *what the terms are* (:meth:`Distiller.method_objective`:
DynamicKD's scaled logits, AKD's reweighted target, CES-KD's per-image expert), never the sum.

Terms whose weight is 0 are not computed; with a disabled schedule (method ``none``) or no teacher the teacher
is never called. Hot-path decisions depend only on Python values (config, ``progress``, ``step``), never on
tensor values, so a CUDA step issues no host synchronisation (exact EMD excepted, see :mod:`gkd_core.losses`).

The teacher is frozen: ``eval()`` always, ``requires_grad=False``, run under ``torch.no_grad`` (not
``inference_mode``: its logits are saved for the KD backward) except on input-gradient-matching steps, where
it runs with grad enabled so its *input* gradient can be taken (its parameters still get none). On those
steps a ``torch.compile``'d student runs eagerly (compiled graphs do not support the double backward).

Several processes (:meth:`Distiller.distribute`): the student's forward goes through DistributedDataParallel
around the student and the method's learnable parameters; the Wasserstein term is computed on the features
of the whole global batch (gathered with their gradients), per-sample terms on the local batch. Input-gradient
matching takes its ``create_graph`` gradient w.r.t. the input only, so DDP's reducer sees one backward (of
``total``) per step.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from gkd_core import distributed
from gkd_core.losses import (
    FeatureProjector,
    input_gradient_matching,
    kd_loss,
    logit_gradient_matching,
    wasserstein_distance,
)
from gkd_core.methods.spec import TERMS, Batch, MethodContext, MethodSpec, Objective, combine
from gkd_core.methods.teacher_cache import TeacherCache
from gkd_core.models import FeatureHook, classifier_of
from gkd_core.schedules import Schedule
from gkd_core.sections import LossesConfig

logger = logging.getLogger(__name__)

__all__ = ["Distiller", "TERMS", "MethodSpec", "MethodContext", "Objective", "Batch", "combine"]

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


# --- the module -------------------------------------------------------------------------------------------


class Distiller(nn.Module):
    """Student + frozen teacher + schedule + losses: the shared forward of every method.

    Args:
        student: the network to train (classifier attribute per the models contract).
        teacher: frozen teacher, or ``None`` to train the student alone.
        schedule: ``w(p)``; a schedule with ``enabled == False`` (``NoSchedule``) turns distillation off.
        losses_cfg: temperature, CE weight, Wasserstein and gradient-matching settings.
        terms: the distillation terms this method uses (a term with weight 0 is not computed either).
        weights: term -> weight (default 1 for each of ``terms``).
        metrics: the extra scalars :meth:`method_objective` reports (always present in the output).
        params: the method's own parameter block (``method.<name>``), kept as ``self.params``.
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
        terms: Sequence[str] = TERMS,
        weights: Optional[Mapping[str, float]] = None,
        metrics: Sequence[str] = (),
        params: Optional[BaseModel] = None,
        label_smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.params = params
        self.student = student
        self.teacher = teacher
        self.schedule = schedule
        self.losses_cfg = losses_cfg if losses_cfg is not None else LossesConfig()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self.seed = int(seed)
        self.extra_metrics = tuple(metrics)
        self._generators: dict[str, torch.Generator] = {}
        self._ddp: Optional[nn.Module] = None  # DDP around the learnable parts (never registered: no state_dict keys)
        self._init_rng = torch.Generator().manual_seed(self.seed)

        cfg = self.losses_cfg
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown terms {sorted(unknown)}; allowed: {', '.join(TERMS)}")
        self.terms = tuple(t for t in TERMS if t in terms)
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.terms}
        self.distill = teacher is not None and schedule.enabled
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        active = [t for t in self.terms if self.distill and self.weights[t] > 0]
        self.active_terms = tuple(active)
        self.use_kd = "kd" in active
        self.use_wasserstein = "wasserstein" in active
        self.use_grad_match = "grad_match" in active

        self.projector: Optional[FeatureProjector] = None
        self._teacher_cache: Optional[TeacherCache] = None  # not a buffer: never checkpointed
        self._student_hook: Optional[FeatureHook] = None
        self._teacher_hook: Optional[FeatureHook] = None
        if self.use_wasserstein:
            assert teacher is not None
            if cfg.wasserstein.method != "sliced":
                logger.warning(
                    "losses.wasserstein.method = %r: on a batch of features this reads the batch-to-batch OT cost, "
                    "about 10x the sliced estimate for 64-d features (a sampling floor; docs/method.md), so the "
                    "W weight tuned for 'sliced' is not the same weight here: re-tune it on the validation split",
                    cfg.wasserstein.method)
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

    @classmethod
    def from_context(cls, spec: MethodSpec, ctx: MethodContext) -> "Distiller":
        """Build this method's module from the run's context (subclasses add their own parts)."""
        return cls(ctx.student, ctx.teacher, ctx.schedule, ctx.losses, terms=spec.terms, weights=ctx.weights,
                   metrics=spec.metrics, params=ctx.params, label_smoothing=ctx.label_smoothing, seed=ctx.seed)

    # --- the training contract (gkd_core.engine.Trainable) --------------------------------------------

    @property
    def metric_names(self) -> dict[str, str]:
        """Output key -> history column of the per-step scalars the training loop averages per epoch: the
        loss terms as ``train_<term>``, the distillation weight and the method's metrics under their names."""
        return {**{k: f"train_{k}" for k in ("total", "ce", *TERMS)}, "weight": "weight",
                **{m: m for m in self.extra_metrics}}

    @property
    def shown_metric_names(self) -> tuple[str, ...]:
        """The history columns an epoch's log line shows: the total and CE, the terms this run computes, the
        distillation weight while distilling, the method's metrics. A teacher (or a student trained alone)
        shows no KD, W, GM or weight columns, a KD student no W or GM; the history keeps every column of
        :attr:`metric_names` (zeros where a term is off), which is what the CSVs and plots read."""
        return ("train_total", "train_ce", *(f"train_{t}" for t in self.active_terms),
                *(("weight",) if self.distill else ()), *self.extra_metrics)

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint holds: everything but the frozen teacher (a dependency of the run, not part of
        it). The schedule's state is included (``get_extra_state``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        bad = [k for k in missing if not k.startswith("teacher.")] + list(unexpected)
        if bad:
            raise RuntimeError(f"checkpoint does not match the model: {bad[:5]}")

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: student + projector at ``base_lr`` (subclasses add their own)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.projector is not None:
            params += list(self.projector.parameters())
        return [{"params": params, "lr": base_lr, "name": "student"}]

    def compile_networks(self) -> None:
        """``torch.compile`` the student and, unless a cache replaces it, the teacher (its forward is most of a
        KD step's kernel launches)."""
        self.student.compile()
        if self.teacher is not None and self.distill and self._teacher_cache is None:
            self.teacher.compile()

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Train under ``wrap`` (DistributedDataParallel): it wraps the student together with the projector and
        :meth:`method_parameters`, so DDP averages all their gradients; the teacher (and any frozen helper)
        stays outside. Until :meth:`undistribute` the student's forward goes through it and batch-level terms
        use the whole global batch."""
        extra = list(self.projector.parameters()) if self.projector is not None else []
        extra += [p for p in self.method_parameters() if p.requires_grad]
        object.__setattr__(self, "_ddp", wrap(distributed.TrainableParts(self.student, extra)))

    def undistribute(self) -> None:
        object.__setattr__(self, "_ddp", None)

    @property
    def distributed(self) -> bool:
        """Whether this module trains as one of several processes (see :meth:`distribute`)."""
        return self._ddp is not None

    def end_epoch(self, progress: float, row: Mapping[str, float]) -> None:
        """The schedule sees each finished epoch (validation accuracy included): an adaptive one refits."""
        self.schedule.observe(progress, row)

    def get_extra_state(self) -> dict[str, Any]:
        """The schedule's state travels with ``state_dict()`` (and so with every checkpoint)."""
        return {"schedule": self.schedule.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])

    # --- structure ----------------------------------------------------------------------------------

    @staticmethod
    def _feature_dim(model: nn.Module) -> int:
        """Penultimate width: ``model.feature_dim`` if set, else the classifier's ``in_features``."""
        dim = getattr(getattr(model, "_orig_mod", model), "feature_dim", None)
        return int(dim) if dim is not None else classifier_of(model).in_features

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for frozen in self.frozen_modules():
            frozen.eval()
        return self

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that stay in eval mode (the teacher; subclasses add theirs)."""
        return [self.teacher] if self.teacher is not None else []

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
                    "gradient on every matched step (use grad_match.variant 'logit', or a method without gradient matching)"
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
            s_logits = (self._ddp if self._ddp is not None else self.student)(x_in)
        with torch.autocast(device_type=device.type, enabled=False):
            ce = F.cross_entropy(s_logits.float(), y, label_smoothing=self.label_smoothing)

        shared = {"wasserstein": zero, "grad_match": zero}
        t_logits: Optional[Tensor] = None
        if self.distill:
            t_logits, ft = self._teacher_outputs(x, x_in, index, input_gm)
            if self.use_wasserstein:
                shared["wasserstein"] = self._wasserstein(ft, device, step)
            if input_gm:
                assert self.teacher is not None
                shared["grad_match"] = input_gradient_matching(self.student, self.teacher, x_in, y, s_logits,
                                                               t_logits)
            elif gm_now and cfg.grad_match.variant == "logit":
                shared["grad_match"] = logit_gradient_matching(s_logits, t_logits.detach(), y)
            t_logits = t_logits.detach()

        batch = Batch(x=x, y=y, progress=progress, step=step, student_logits=s_logits, teacher_logits=t_logits,
                      ce=ce)
        objective = self.method_objective(batch) if self.distill else Objective()
        terms = {k: v for k, v in shared.items() if getattr(self, f"use_{k}")}
        terms.update(objective.terms)
        total = combine(ce, cfg.ce_weight, w, terms, self.weights, objective, self.distill)
        out: dict[str, Tensor] = {
            "ce": ce,
            "kd": objective.terms.get("kd", zero),
            **shared,
            "weight": torch.full((), w, dtype=torch.float32, device=device),
            "logits": s_logits,
            "total": total,
        }
        out.update({name: zero for name in self.extra_metrics})  # declared, even on a step that has none
        out.update(objective.metrics)
        return out

    def _teacher_outputs(self, x: Tensor, x_in: Tensor, index: Optional[Tensor],
                         input_gm: bool) -> tuple[Tensor, Optional[Tensor]]:
        """Teacher logits (with a graph to ``x_in`` on input-GM steps) and, for W, its features (from the
        cache when one is attached and the step allows it, else from the teacher's feature hook)."""
        assert self.teacher is not None
        cache = self._teacher_cache if index is not None and not input_gm else None
        if cache is not None:
            assert index is not None
            t_logits = cache.logits.index_select(0, index)
            ft = cache.features.index_select(0, index) if self.use_wasserstein and cache.features is not None else None
            return t_logits, ft
        if input_gm:
            with torch.enable_grad():
                t_logits = self.teacher(x_in)
        else:
            with torch.no_grad():
                t_logits = self.teacher(x)
        return t_logits, None

    def _wasserstein(self, ft: Optional[Tensor], device: torch.device, step: int) -> Tensor:
        assert self._student_hook is not None and self._teacher_hook is not None
        fs = self._student_hook.features
        if ft is None:
            ft = self._teacher_hook.features
        assert fs is not None and ft is not None
        fs, ft = fs.flatten(1), ft.detach().flatten(1)
        if self.projector is not None:
            fs = self.projector(fs)
        if self._ddp is not None:  # W between the global batch's feature clouds, as one process would compute it
            fs, ft = distributed.gather_rows(fs, grad=True), distributed.gather_rows(ft)
        wc = self.losses_cfg.wasserstein
        return wasserstein_distance(
            fs, ft, method=wc.method, n_projections=wc.n_projections, sinkhorn_reg=wc.sinkhorn_reg,
            sinkhorn_iters=wc.sinkhorn_iters, normalize=wc.normalize_features,
            generator=self._generator(device, step) if wc.method == "sliced" else None,
        )

    def method_objective(self, batch: Batch) -> Objective:
        """The method's own part of the objective on one batch (distillation on): Hinton's KD here;
        subclasses replace the KD term, set scales, add auxiliary losses and metrics."""
        if not self.use_kd:
            return Objective()
        assert batch.teacher_logits is not None
        return Objective(terms={"kd": kd_loss(batch.student_logits, batch.teacher_logits,
                                              self.losses_cfg.temperature)})
