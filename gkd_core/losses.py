"""The distillation losses: KD, feature Wasserstein (POT), gradient matching, and the feature projector.

Every loss is a pure function of tensors (or a small ``nn.Module``), computed in float32 even under autocast,
and runs on whatever device its inputs live on without host synchronisation, except exact EMD (``ot.emd2``
solves on the CPU; see :func:`wasserstein_distance`).

Conventions (also in docs/method.md):

* **KD** is Hinton's ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch (``batchmean``).
  The teacher logits are *not* detached here; the caller decides (:class:`gkd_core.methods.Distiller` detaches).
* **Wasserstein** returns a *squared* 2-Wasserstein quantity, ``W2^2``, for every method, with squared
  Euclidean ground cost, so that ``l_w`` means the same thing whichever solver is selected:

  - ``sliced``: ``d * mean_k W2^2(<theta_k, fs>, <theta_k, ft>)`` over ``n_projections`` random unit
    directions ``theta_k`` in R^d (1-D problems solved by ``ot.wasserstein_1d``). Without the factor ``d`` the
    sliced value is about ``W2^2 / d`` (since ``E[(theta.z)^2] = |z|^2 / d``), i.e. 1000x smaller for 1000-d
    features; with it, it is on the scale of (and in expectation a lower bound of) the exact ``W2^2``. For
    ``d = 1`` it *is* the exact ``W2^2``. Directions come from a ``torch.Generator`` on the inputs' device, so
    they are reproducible and never touch the global RNG.
  - ``sinkhorn``: entropic OT plan from a fixed number of log-domain Sinkhorn iterations on the cost
    normalised by its (detached) maximum, so ``sinkhorn_reg`` is relative to the largest cost; the returned
    value is ``<P, M>`` with the *unnormalised* cost ``M``. The plan is computed without a graph and the
    gradient is the envelope-theorem gradient ``dM -> P`` (the same convention as POT's ``emd2``).
    The iterations are the same updates as POT's ``ot.sinkhorn(..., method="sinkhorn_log")`` (checked against
    it in the tests) but run for exactly ``sinkhorn_iters`` steps: POT's convergence test reads the error on
    the host every 10 iterations, which would put device synchronisations in every training step.
  - ``emd``: exact OT via ``ot.emd2`` (network simplex, on the CPU: the cost matrix is copied to the host,
    one synchronisation per call; fine for batches of a few hundred, meant for checks and small runs).
    Differentiable: POT returns the optimal plan as the gradient w.r.t. the cost.

* **Gradient matching** is ``mean_i (1 - cos(g_s_i, g_t_i))``: scale-free, in [0, 2], zero when the two
  gradients point the same way. ``input`` variant: the direction of the CE loss's gradient w.r.t. the input
  image (double backward for the student); ``logit`` variant: w.r.t. the logits. Both directions are taken
  from the margin ``logsumexp_{j != y} z_j - z_y`` (:func:`margin_loss`), whose gradient points where CE's does
  but keeps its label component in float32 for confident samples (CE's rounds to 0 beyond a ~17 logit margin).
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Optional

import ot
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

WassersteinMethod = Literal["sliced", "sinkhorn", "emd"]
WASSERSTEIN_METHODS: tuple[str, ...] = ("sliced", "sinkhorn", "emd")

__all__ = [
    "kd_loss",
    "wasserstein_distance",
    "sliced_projections",
    "sinkhorn_plan",
    "FeatureProjector",
    "input_gradient_matching",
    "logit_gradient_matching",
    "cosine_distance",
    "WASSERSTEIN_METHODS",
]


def _float32(device: torch.device) -> torch.autocast:
    """A context that turns autocast off on ``device`` (the losses then run in the dtype they cast to)."""
    return torch.autocast(device_type=device.type, enabled=False)


# --- KD ----------------------------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean, float32.

    Gradients flow into both arguments; detach the teacher logits at the call site when the teacher is frozen.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    with _float32(student_logits.device):
        log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
        log_pt = F.log_softmax(teacher_logits.float() / t, dim=-1)
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * (t * t)


# --- Wasserstein -------------------------------------------------------------------------------------


def sliced_projections(dim: int, n_projections: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``(dim, n_projections)`` float32 unit directions, uniform on the sphere, drawn from ``generator``.

    ``generator`` must live on ``device`` (a CUDA generator for CUDA tensors), so no host round trip happens.
    """
    theta = torch.randn(dim, n_projections, generator=generator, device=device, dtype=torch.float32)
    return theta / theta.norm(dim=0, keepdim=True).clamp_min(1e-12)


def sinkhorn_plan(cost: Tensor, reg: float, iters: int) -> Tensor:
    """Entropic OT plan between uniform measures for a ``(n, m)`` cost: ``iters`` log-domain Sinkhorn steps.

    Same update order as POT's ``sinkhorn_log`` (v, then u); a fixed iteration count, no convergence check,
    so no host synchronisation. Returns the plan ``exp(-C/reg + u_i + v_j)`` (no graph is built if called
    under ``torch.no_grad``).
    """
    n, m = cost.shape
    neg = -cost / reg
    log_a = -math.log(n)
    log_b = -math.log(m)
    u = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    v = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    for _ in range(iters):
        v = log_b - torch.logsumexp(neg + u[:, None], dim=0)
        u = log_a - torch.logsumexp(neg + v[None, :], dim=1)
    return torch.exp(neg + u[:, None] + v[None, :])


def _sq_euclidean(fs: Tensor, ft: Tensor) -> Tensor:
    """``(n, m)`` squared Euclidean costs, clamped at 0 against round-off (POT's ``ot.dist`` convention)."""
    return ot.dist(fs, ft, metric="sqeuclidean").clamp_min(0.0)


def wasserstein_distance(
    fs: Tensor,
    ft: Tensor,
    method: WassersteinMethod = "sliced",
    n_projections: int = 64,
    sinkhorn_reg: float = 0.05,
    sinkhorn_iters: int = 100,
    normalize: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
) -> Tensor:
    """Squared 2-Wasserstein distance (estimate) between feature batches ``fs`` (n, d) and ``ft`` (m, d).

    Both batches are uniform empirical measures; rows are L2-normalised first when ``normalize``. The result
    is a 0-dim float32 tensor on the inputs' device, differentiable w.r.t. both batches (detach the teacher's
    at the call site). See the module docstring for what each ``method`` computes and costs.

    ``generator`` (sliced only) draws the random directions; it must be on the inputs' device. Without one,
    a fresh generator seeded with ``seed`` is used, so the result is deterministic either way.
    """
    if fs.dim() != 2 or ft.dim() != 2:
        raise ValueError(f"feature batches must be 2-D (batch, dim), got {tuple(fs.shape)} and {tuple(ft.shape)}")
    if fs.shape[1] != ft.shape[1]:
        raise ValueError(
            f"feature widths differ ({fs.shape[1]} vs {ft.shape[1]}): project the student features first "
            "(FeatureProjector)"
        )
    if method not in WASSERSTEIN_METHODS:
        raise ValueError(f"unknown Wasserstein method {method!r}; allowed: {', '.join(WASSERSTEIN_METHODS)}")
    device = fs.device
    with _float32(device):
        xs, xt = fs.float(), ft.float()
        if normalize:
            xs = F.normalize(xs, dim=1)
            xt = F.normalize(xt, dim=1)
        if method == "sliced":
            d = xs.shape[1]
            if generator is None:
                generator = torch.Generator(device=device)
                generator.manual_seed(seed)
            theta = sliced_projections(d, n_projections, generator, device)
            per_direction = ot.wasserstein_1d(xs @ theta, xt @ theta, p=2)  # (K,) W2^2 of each 1-D problem
            return per_direction.mean() * d
        cost = _sq_euclidean(xs, xt)
        if method == "sinkhorn":
            with torch.no_grad():
                scale = cost.amax().clamp_min(1e-12)
                plan = sinkhorn_plan(cost / scale, sinkhorn_reg, sinkhorn_iters)
            return (plan * cost).sum()
        # exact EMD: POT solves on the CPU and returns the plan as the gradient w.r.t. the cost
        n, m = cost.shape
        a = torch.full((n,), 1.0 / n, dtype=cost.dtype, device=device)
        b = torch.full((m,), 1.0 / m, dtype=cost.dtype, device=device)
        return ot.emd2(a, b, cost)


class FeatureProjector(nn.Module):
    """Learned linear map from the student's feature width to the teacher's: ``f -> W f`` (no bias).

    Used only when the widths differ. No bias on purpose: a bias would let the projector translate the whole
    student cloud onto the teacher's mean by itself, taking that part of the alignment off the student.
    Initialised like ``nn.Linear`` (Kaiming-uniform), optionally from a dedicated ``generator`` so building
    it does not consume the global RNG.
    """

    def __init__(self, in_dim: int, out_dim: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"projector widths must be >= 1, got {in_dim} -> {out_dim}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.linear = nn.Linear(self.in_dim, self.out_dim, bias=False)
        bound = 1.0 / math.sqrt(self.in_dim)
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}, bias=False"


# --- gradient matching -------------------------------------------------------------------------------


def cosine_distance(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """``mean_i (1 - cos(a_i, b_i))`` over the first dimension, rows flattened, float32.

    A zero row has cosine 0 with anything (distance 1), never NaN.
    """
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    dot = (a * b).sum(dim=1)
    # norms via sqrt(sum^2 + eps^2): finite gradient at zero (double backward included)
    na = (a.square().sum(dim=1) + eps * eps).sqrt()
    nb = (b.square().sum(dim=1) + eps * eps).sqrt()
    return (1.0 - dot / (na * nb)).mean()


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``sum_i g_i`` with ``g_i = logsumexp_{j != y_i} z_ij - z_i,y_i``: the gradient-matching target.

    ``CE_i = log(1 + exp(g_i))``, so ``dCE_i/d(.) = sigmoid(g_i) * dg_i/d(.)``: the same direction per sample,
    which is all a cosine compares. Unlike CE's, g's gradient keeps its direction in float32 for very
    confident samples: ``dCE/dz = softmax(z) - onehot(y)`` loses its label component (``p_y - 1`` rounds to 0
    once the logit margin reaches ~17) while ``dg/dz_y = -1`` exactly. Summed, not averaged, so per-sample
    input gradients do not shrink with the batch size.
    """
    z = logits.float()
    target = z.gather(1, y.view(-1, 1)).squeeze(1)
    others = z.scatter(1, y.view(-1, 1), float("-inf"))
    return (torch.logsumexp(others, dim=1) - target).sum()


def input_gradient_matching(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    student_logits: Optional[Tensor] = None,
    teacher_logits: Optional[Tensor] = None,
) -> Tensor:
    """``mean_i (1 - cos(dCE_s/dx_i, dCE_t/dx_i))``: input-gradient (saliency) matching, Srinivas & Fleuret 2018.

    The directions are computed through :func:`margin_loss` (same direction as CE's, stable in float32 for
    confident samples). ``g_s = d g(student(x), y) / dx`` is taken with ``create_graph=True`` so the loss backpropagates into the
    student's parameters (double backward); ``g_t`` is the teacher's input gradient, detached: the teacher
    receives no gradient (``torch.autograd.grad`` never writes ``.grad``, and ``g_t`` is cut from the graph).

    Reusing forwards: pass ``student_logits`` / ``teacher_logits`` computed *from this very ``x``*, which must
    then require grad (``x = x.detach().requires_grad_(True)`` before both forwards; the teacher forward must
    run with grad enabled). The distiller does that, so one student forward and one teacher forward serve CE,
    KD, Wasserstein and this loss. Cost per applied step: an extra backward through the teacher, a
    ``create_graph`` backward through the student, and then the total's backward goes through that graph too:
    roughly 2-3x the step time of plain KD (``grad_match.every`` amortises it).

    Without logits the function runs the forwards itself on a fresh leaf copy of ``x``. Must be called with
    grad enabled (it builds graphs).
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("input_gradient_matching needs grad mode (it differentiates w.r.t. the input)")
    if student_logits is None or teacher_logits is None:
        if (student_logits is None) != (teacher_logits is None) and not x.requires_grad:
            raise ValueError("logits passed for one model only, but x does not require grad")
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        if student_logits is None:
            student_logits = student(x)
        if teacher_logits is None:
            teacher_logits = teacher(x)
    elif not x.requires_grad:
        raise ValueError("student_logits/teacher_logits must come from an x that requires grad")
    if not teacher_logits.requires_grad:
        raise ValueError("teacher_logits carry no graph to x: run the teacher forward with grad enabled")
    with _float32(x.device):
        (g_t,) = torch.autograd.grad(margin_loss(teacher_logits, y), x)
        (g_s,) = torch.autograd.grad(margin_loss(student_logits, y), x, create_graph=True)
        return cosine_distance(g_s, g_t.detach())


def margin_gradient(logits: Tensor, y: Tensor) -> Tensor:
    """``dg/dz`` of :func:`margin_loss` per sample: ``softmax`` over the other classes, ``-1`` at the label.
    The direction of the CE gradient ``softmax(z) - onehot(y)``, exact in float32 at any confidence."""
    z = logits.float()
    # scatter, not F.one_hot: no range check on the labels, so no host synchronisation on CUDA
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, y.view(-1, 1), True)
    rest = F.softmax(z.masked_fill(mask, float("-inf")), dim=-1)
    return rest.masked_fill(mask, -1.0)


def logit_gradient_matching(student_logits: Tensor, teacher_logits: Tensor, y: Tensor) -> Tensor:
    """Cheap variant: ``mean_i (1 - cos(dg/dz_s_i, dg/dz_t_i))`` with :func:`margin_gradient`, the direction of
    the CE gradients w.r.t. the logits (no double backward); gradients flow into both arguments, so detach the
    teacher's at the call site."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    with _float32(student_logits.device):
        return cosine_distance(margin_gradient(student_logits, y), margin_gradient(teacher_logits, y))
