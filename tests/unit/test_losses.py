import copy
import math

import ot
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkd_core.losses import (
    FeatureProjector,
    cosine_distance,
    input_gradient_matching,
    kd_loss,
    logit_gradient_matching,
    margin_gradient,
    sinkhorn_plan,
    wasserstein_distance,
)


class TinyNet(nn.Module):
    """Smallest model that follows the models contract (classifier ``fc`` over ``feature_dim`` features)."""

    classifier_name = "fc"

    def __init__(self, in_features: int = 12, feature_dim: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, feature_dim), nn.Tanh())
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


# --- KD ----------------------------------------------------------------------------------------------


def test_kd_zero_for_identical_logits():
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_hand_computed_2x3():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow), softmax(trow)
        kl += sum(q * math.log(q / p) for q, p in zip(pt, ps))
    expected = T * T * kl / 2  # batchmean over 2 rows
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)


def test_kd_temperature_squared_scaling():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    T = 3.0
    # softmax((T z)/T) = softmax(z): the only difference is the T^2 factor
    assert kd_loss(T * s, T * t, T).item() == pytest.approx(T * T * kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_kd_is_float32_under_autocast_and_gradient_reaches_student():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kd_loss(s.bfloat16(), t.bfloat16(), 4.0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


# --- Wasserstein -------------------------------------------------------------------------------------


def test_sliced_1d_equals_closed_form():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 1, generator=g), 2.0 * torch.randn(16, 1, generator=g) + 1.0
    expected = ((a.flatten().sort().values - b.flatten().sort().values) ** 2).mean()
    got = wasserstein_distance(a, b, "sliced", n_projections=8, normalize=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # and the exact solver agrees in 1-D
    assert wasserstein_distance(a, b, "emd", normalize=False).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["sliced", "emd"])
def test_wasserstein_zero_for_identical_batches(method):
    f = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    assert wasserstein_distance(f, f.clone(), method).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["sliced", "sinkhorn", "emd"])
def test_wasserstein_gradient_flows_to_student_features(method):
    g = torch.Generator().manual_seed(4)
    fs = torch.randn(12, 5, generator=g).requires_grad_(True)
    ft = torch.randn(12, 5, generator=g) + 0.5
    loss = wasserstein_distance(fs, ft, method)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


def test_sliced_gradient_finite_at_identical_batches():
    fs = torch.randn(8, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    wasserstein_distance(fs, fs.detach().clone(), "sliced").backward()
    assert torch.isfinite(fs.grad).all()


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_sinkhorn_plan_matches_pot_log_sinkhorn():
    g = torch.Generator().manual_seed(6)
    cost = torch.rand(7, 9, generator=g, dtype=torch.float64)
    ours = sinkhorn_plan(cost, reg=0.05, iters=50)
    a, b = torch.full((7,), 1 / 7, dtype=torch.float64), torch.full((9,), 1 / 9, dtype=torch.float64)
    # stopThr=0: POT never stops early, so both run exactly 50 iterations
    ref = ot.sinkhorn(a, b, cost, 0.05, method="sinkhorn_log", numItermax=50, stopThr=0.0)
    assert torch.allclose(ours, ref, rtol=1e-8, atol=1e-10)


def test_sinkhorn_close_to_exact_emd():
    g = torch.Generator().manual_seed(7)
    fs, ft = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g) + 0.5
    exact = wasserstein_distance(fs, ft, "emd", normalize=False).item()
    approx = wasserstein_distance(fs, ft, "sinkhorn", sinkhorn_reg=0.01, sinkhorn_iters=500, normalize=False).item()
    assert exact > 0
    assert approx == pytest.approx(exact, rel=0.05)
    assert approx >= exact - 1e-6  # the entropic plan is feasible, so its cost cannot beat the optimum


def test_emd_exact_on_permutation_and_translation():
    g = torch.Generator().manual_seed(8)
    fs = torch.randn(6, 3, generator=g)
    perm = torch.randperm(6, generator=g)
    assert wasserstein_distance(fs, fs[perm], "emd", normalize=False).item() == pytest.approx(0.0, abs=1e-5)
    shift = torch.tensor([0.3, -1.0, 2.0])
    # a rigid translation by v costs exactly |v|^2 under the squared Euclidean ground cost
    got = wasserstein_distance(fs, fs[perm] + shift, "emd", normalize=False).item()
    assert got == pytest.approx(shift.square().sum().item(), rel=1e-5)


def test_sliced_is_deterministic_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(9)
    fs, ft = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    state = torch.get_rng_state()
    a = wasserstein_distance(fs, ft, "sliced", seed=3)
    b = wasserstein_distance(fs, ft, "sliced", seed=3)
    c = wasserstein_distance(fs, ft, "sliced", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.item() == b.item() and a.item() != c.item()
    gen1, gen2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert wasserstein_distance(fs, ft, generator=gen1).item() == wasserstein_distance(fs, ft, generator=gen2).item()


def _gaussian_pair(kind: str, n: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Two Gaussian batches whose *population* W2^2 is 1: a mean shift, or an isotropic spread change."""
    if kind == "shift":
        mu = torch.zeros(d)
        mu[0] = 1.0
        return 0.3 * torch.randn(n, d, generator=g), 0.3 * torch.randn(n, d, generator=g) + mu, 1.0
    s1, s2 = 0.3, 0.3 + d ** -0.5  # W2^2 = d (s2 - s1)^2 = 1
    return s1 * torch.randn(n, d, generator=g), s2 * torch.randn(n, d, generator=g), 1.0


@pytest.mark.parametrize("kind", ["shift", "spread"])
@pytest.mark.parametrize("n", [64, 256])
def test_sliced_estimates_the_population_w2_and_batch_ot_reads_a_sampling_floor(kind, n):
    """What docs/method.md states about the estimators' scales, measured: at equal population W2^2 (= 1),
    d * SW2^2 (sliced) reads ~1 for a mean shift and for a spread change alike, at both batch sizes; exact
    OT between the two 64-d batches (emd, and sinkhorn with it) reads several times more, a sampling floor
    that does not shrink with the batch. (The old docs claimed sliced was 'on the scale of exact W2^2'.)"""
    g = torch.Generator().manual_seed(7)
    sliced, emd = [], []
    for _ in range(3):
        fs, ft, pop = _gaussian_pair(kind, n, 64, g)
        sliced.append(wasserstein_distance(fs, ft, "sliced", n_projections=256, normalize=False).item() / pop)
        emd.append(wasserstein_distance(fs, ft, "emd", normalize=False).item() / pop)
    sliced_mean, emd_mean = sum(sliced) / 3, sum(emd) / 3
    assert 0.7 < sliced_mean < 1.8, sliced
    assert emd_mean > 5.0 * sliced_mean, (emd_mean, sliced_mean)


def test_sliced_matches_exact_w2_in_low_dimension():
    # in 4-d with 64 points the batch OT is a fair estimate too, and both agree
    g = torch.Generator().manual_seed(10)
    fs, ft = torch.randn(64, 4, generator=g), 0.5 * torch.randn(64, 4, generator=g) + 1.0
    exact = wasserstein_distance(fs, ft, "emd", normalize=False).item()
    sliced = wasserstein_distance(fs, ft, "sliced", n_projections=512, normalize=False).item()
    assert 0.5 * exact < sliced < 1.05 * exact


def test_wasserstein_rejects_width_mismatch_and_unknown_method():
    with pytest.raises(ValueError, match="FeatureProjector"):
        wasserstein_distance(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="allowed"):
        wasserstein_distance(torch.randn(4, 3), torch.randn(4, 3), method="gaussian")


def test_normalize_makes_the_distance_scale_invariant():
    g = torch.Generator().manual_seed(12)
    fs, ft = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    a = wasserstein_distance(fs, ft, "emd")
    b = wasserstein_distance(10 * fs, 3 * ft, "emd")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_feature_projector_maps_widths_without_bias_and_is_seedable():
    p1 = FeatureProjector(6, 10, generator=torch.Generator().manual_seed(0))
    p2 = FeatureProjector(6, 10, generator=torch.Generator().manual_seed(0))
    assert p1(torch.randn(3, 6)).shape == (3, 10)
    assert p1.linear.bias is None
    assert torch.equal(p1.linear.weight, p2.linear.weight)


# --- gradient matching -------------------------------------------------------------------------------


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    student = TinyNet()
    teacher = TinyNet()
    x = torch.randn(6, 3, 2, 2)
    y = torch.randint(0, 5, (6,))
    return student, teacher, x, y


def test_input_gm_zero_when_teacher_is_a_copy_of_the_student():
    student, _, x, y = _pair()
    teacher = copy.deepcopy(student).requires_grad_(False)
    assert input_gradient_matching(student, teacher, x, y).item() == pytest.approx(0.0, abs=1e-5)


def test_input_gm_double_backward_reaches_student_not_teacher():
    student, teacher, x, y = _pair(1)
    teacher.requires_grad_(True)  # even a teacher that *could* take grads must not get any
    loss = input_gradient_matching(student, teacher, x, y)
    assert 0.0 < loss.item() <= 2.0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.body.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_input_gm_reuses_given_forwards():
    student, teacher, x, y = _pair(2)
    xi = x.detach().requires_grad_(True)
    s_logits, t_logits = student(xi), teacher(xi)
    reused = input_gradient_matching(student, teacher, xi, y, s_logits, t_logits)
    fresh = input_gradient_matching(student, teacher, x, y)
    assert reused.item() == pytest.approx(fresh.item(), rel=1e-6)
    with pytest.raises(ValueError, match="requires grad"):
        input_gradient_matching(student, teacher, x, y, student(x), teacher(x))


def _confident_linear_pair(dtype: torch.dtype, margin: float):
    """Student and teacher: linear maps 12 -> 5 whose label logit leads by ``margin`` (a confident teacher)."""
    g = torch.Generator().manual_seed(3)
    ws, wt = 0.3 * torch.randn(5, 12, generator=g), 0.3 * torch.randn(5, 12, generator=g)
    x, y = torch.randn(4, 12, generator=g), torch.tensor([0, 1, 2, 3])
    bump = margin * F.one_hot(y, 5)

    def net(w):
        return lambda inp: inp @ w.to(dtype).t() + bump.to(dtype)

    return net(ws), net(wt), x.to(dtype), y


@pytest.mark.parametrize("margin", [5.0, 20.0, 30.0])
def test_input_gm_keeps_its_target_for_confident_samples(margin):
    """In float32 the CE gradient's label component rounds to 0 beyond a ~17 logit margin (cosine to the
    exact direction ~0.6); the margin target keeps float32 GM equal to the float64 value."""
    values = {}
    for dtype in (torch.float32, torch.float64):
        student, teacher, x, y = _confident_linear_pair(dtype, margin)
        values[dtype] = input_gradient_matching(student, teacher, x.requires_grad_(True), y).item()
    assert values[torch.float32] == pytest.approx(values[torch.float64], abs=1e-4)


def test_margin_gradient_is_the_ce_gradient_direction():
    g = torch.Generator().manual_seed(4)
    z, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    ce = F.softmax(z, -1) - F.one_hot(y, 5)
    assert torch.allclose(F.cosine_similarity(margin_gradient(z, y).double(), ce, dim=1),
                          torch.ones(6, dtype=torch.float64), atol=1e-6)
    confident = z + 40.0 * F.one_hot(y, 5)
    assert (margin_gradient(confident.float(), y).gather(1, y.view(-1, 1)) == -1.0).all()  # label part kept


def test_logit_gm_zero_for_identical_logits_and_matches_formula():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    assert logit_gradient_matching(z, z.clone(), y).item() == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(5, 4, generator=g)
    onehot = F.one_hot(y, 4).float()
    gs, gt = z.softmax(-1) - onehot, zt.softmax(-1) - onehot  # CE's logit gradients: the same directions
    expected = (1 - F.cosine_similarity(gs, gt, dim=1)).mean()
    assert logit_gradient_matching(z, zt, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cosine_distance_handles_zero_rows():
    a = torch.zeros(2, 3, requires_grad=True)
    d = cosine_distance(a, torch.ones(2, 3))
    d.backward()
    assert d.item() == pytest.approx(1.0) and torch.isfinite(a.grad).all()
