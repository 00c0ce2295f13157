import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkd_core.config import LossesConfig, MethodConfig
from gkd_core.methods import METHODS, TERMS, Distiller, MethodSpec, build_distiller, method_module
from gkd_core.methods.akd import AKDDistiller, AKDParams
from gkd_core.methods.ces_kd import CESKDDistiller, expert_index
from gkd_core.methods.dynamic_kd import DynamicKDDistiller, DynamicKDParams
from gkd_core.losses import kd_loss
from gkd_core.models import build_model
from gkd_core.schedules import ConstantSchedule, GompertzSchedule, NoSchedule

KEYS = {"ce", "kd", "wasserstein", "grad_match", "weight", "total", "logits"}
SCALARS = ("ce", "kd", "wasserstein", "grad_match", "weight", "total")


class TinyNet(nn.Module):
    """Smallest model that follows the models contract (classifier ``fc`` over ``feature_dim`` features)."""

    classifier_name = "fc"

    def __init__(self, feature_dim: int = 8, num_classes: int = 5, in_features: int = 12) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, feature_dim), nn.Tanh())
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    # torch.testing.assert_close imports torch.distributed (>1 s); a plain allclose is enough here
    assert a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol), (a, b)


def make(student_dim=8, teacher_dim=16, seed=0):
    torch.manual_seed(seed)
    student, teacher = TinyNet(student_dim), TinyNet(teacher_dim)
    x = torch.randn(8, 3, 2, 2)
    y = torch.randint(0, 5, (8,))
    return student, teacher, x, y


@dataclass
class Cfg:
    """Loss settings plus the weights of the three terms (the full objective's, as ``gompertz`` has them)."""

    losses: LossesConfig
    weights: dict


def cfg(kd=1.0, w=1.0, gm=1.0, variant="input", every=1, method="sliced", ce=1.0):
    losses = LossesConfig(ce_weight=ce, wasserstein={"method": method}, grad_match={"variant": variant, "every": every})
    return Cfg(losses, {"kd": kd, "wasserstein": w, "grad_match": gm})


def D(student, teacher, schedule, c=None, cls=Distiller, **kw):
    """A module of class ``cls`` with the full objective's terms at the weights of ``c``."""
    c = c or cfg()
    return cls(student, teacher, schedule, c.losses, weights=c.weights, **kw)


def recompute_total(out, c: Cfg):
    w = c.weights
    return c.losses.ce_weight * out["ce"] + out["weight"] * (
        w["kd"] * out["kd"] + w["wasserstein"] * out["wasserstein"] + w["grad_match"] * out["grad_match"]
    )


def test_registry_is_a_plain_dict_of_specs():
    assert type(METHODS) is dict and all(isinstance(s, MethodSpec) and s.name == n for n, s in METHODS.items())
    assert list(METHODS) == ["none", "kd", "linear", "cosine", "logistic", "gompertz", "gompertz_kd", "full_constant",
                             "kd_dose_matched", "gompertz_kd_dose_matched", "adaptive_gompertz", "dynamic_kd", "akd",
                             "ces_kd"]
    classes = {n: method_module(s) for n, s in METHODS.items()}
    assert classes["dynamic_kd"] is DynamicKDDistiller and classes["akd"] is AKDDistiller
    assert classes["ces_kd"] is CESKDDistiller and classes["gompertz"] is Distiller and METHODS["gompertz"].distiller is None
    assert METHODS["none"].terms == () and not METHODS["none"].needs_teacher


@pytest.mark.parametrize("name", [n for n in METHODS if n not in ("none", "ces_kd")])
def test_each_method_reports_what_its_spec_declares(name):
    spec = METHODS[name]
    student, teacher, x, y = make()
    d = build_distiller(MethodConfig(name=name), cfg().losses, student, teacher, seed=0)
    out = d(x, y, progress=0.5)
    assert set(out) == KEYS | set(spec.metrics)
    assert set(d.metric_names) == {"total", "ce", *TERMS, "weight", *spec.metrics}
    for term in TERMS:
        assert (out[term].item() != 0.0) == (term in spec.terms), term


def test_output_keys_total_formula_and_weight():
    student, teacher, x, y = make()
    schedule = GompertzSchedule()
    c = cfg()
    d = D(student, teacher, schedule, c)
    out = d(x, y, progress=0.3, step=0)
    assert set(out) == KEYS
    for k in SCALARS:
        assert out[k].dim() == 0 and out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
    assert out["logits"].shape == (8, 5)
    assert out["weight"].item() == pytest.approx(schedule.weight(0.3))
    assert all(out[k].item() > 0 for k in ("ce", "kd", "wasserstein", "grad_match"))
    assert_close(out["total"], recompute_total(out, c))


@pytest.mark.parametrize(
    "terms",
    [
        dict(kd=1.0, w=0.0, gm=0.0),
        dict(kd=0.0, w=1.0, gm=0.0),
        dict(kd=0.0, w=1.0, gm=0.0, method="sinkhorn"),
        dict(kd=0.0, w=0.0, gm=1.0, variant="input"),
        dict(kd=0.0, w=0.0, gm=1.0, variant="logit"),
        dict(kd=1.0, w=1.0, gm=1.0, variant="input"),
    ],
    ids=["kd", "sliced", "sinkhorn", "gm_input", "gm_logit", "all"],
)
def test_gradients_reach_student_and_projector_only(terms):
    student, teacher, x, y = make()
    # ce = 0: every student gradient below comes from the distillation term under test
    d = D(student, teacher, ConstantSchedule(a=1.0), cfg(ce=0.0, **terms))
    d.train()
    d(x, y, progress=0.5)["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    if terms["w"] > 0:
        assert d.projector is not None and d.projector.linear.weight.grad.abs().sum() > 0
    # body parameters always influence the term; fc's bias does not influence W (features precede fc)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.body.parameters())
    assert {id(p) for p in d.trainable_parameters()}.isdisjoint(id(p) for p in teacher.parameters())


def test_teacher_is_frozen_and_stays_in_eval():
    student, teacher, x, y = make()
    d = D(student, teacher, ConstantSchedule(), cfg())
    d.train()
    assert d.training and student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    d.eval()
    d.train(True)
    assert not teacher.training


def test_projector_only_when_widths_differ_and_in_trainable_parameters():
    student, teacher, *_ = make(student_dim=8, teacher_dim=16)
    d = D(student, teacher, ConstantSchedule(), cfg())
    assert d.projector is not None and (d.projector.in_dim, d.projector.out_dim) == (8, 16)
    ids = {id(p) for p in d.trainable_parameters()}
    assert id(d.projector.linear.weight) in ids and all(id(p) in ids for p in student.parameters())
    student, teacher, *_ = make(student_dim=16, teacher_dim=16)
    assert D(student, teacher, ConstantSchedule(), cfg()).projector is None
    # no Wasserstein term, no projector even with different widths
    student, teacher, *_ = make()
    assert D(student, teacher, ConstantSchedule(), cfg(w=0.0)).projector is None


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("no_teacher", [False, True], ids=["schedule_none", "teacher_none"])
def test_method_none_never_calls_the_teacher(no_teacher):
    student, teacher, x, y = make()
    calls = _count_calls(teacher)
    d = D(student, None if no_teacher else teacher, NoSchedule(), cfg(), label_smoothing=0.1)
    out = d(x, y, progress=0.5)
    assert not calls
    assert set(out) == KEYS
    for k in ("kd", "wasserstein", "grad_match", "weight"):
        assert out[k].item() == 0.0
    expected_ce = F.cross_entropy(out["logits"], y, label_smoothing=0.1)
    assert_close(out["ce"], expected_ce)
    assert_close(out["total"], out["ce"])
    assert d.projector is None


def test_zero_weight_terms_are_skipped():
    student, teacher, x, y = make()
    d = D(student, teacher, ConstantSchedule(), cfg(kd=0.0, w=0.0, gm=0.0))
    out = d(x, y, progress=0.5)
    assert out["kd"].item() == out["wasserstein"].item() == out["grad_match"].item() == 0.0
    assert_close(out["total"], out["ce"])


@pytest.mark.parametrize("variant", ["input", "logit"])
def test_grad_match_every_two_steps(variant):
    student, teacher, x, y = make()
    d = D(student, teacher, ConstantSchedule(), cfg(variant=variant, every=2))
    values = [d(x, y, progress=0.5, step=s)["grad_match"].item() for s in range(4)]
    assert values[0] > 0 and values[2] > 0
    assert values[1] == 0.0 and values[3] == 0.0


def test_input_gm_under_no_grad_reports_zero():
    student, teacher, x, y = make()
    d = D(student, teacher, ConstantSchedule(), cfg())
    with torch.no_grad():
        out = d(x, y, progress=0.5)
    assert out["grad_match"].item() == 0.0 and torch.isfinite(out["total"])


def test_sliced_directions_depend_on_seed_and_step_only():
    student, teacher, x, y = make()
    c = cfg(kd=0.0, gm=0.0)
    d1 = D(student, teacher, ConstantSchedule(), c, seed=5)
    d2 = D(copy.deepcopy(student), copy.deepcopy(teacher), ConstantSchedule(), c, seed=5)
    torch.manual_seed(123)  # the global RNG plays no part
    a = d1(x, y, progress=0.5, step=7)["wasserstein"].item()
    _ = d1(x, y, progress=0.5, step=8)
    torch.manual_seed(999)
    assert d2(x, y, progress=0.5, step=7)["wasserstein"].item() == a
    assert d1(x, y, progress=0.5, step=7)["wasserstein"].item() == a
    assert d1(x, y, progress=0.5, step=8)["wasserstein"].item() != a


def test_param_groups_cover_trainable_parameters():
    student, teacher, *_ = make()
    d = D(student, teacher, ConstantSchedule(), cfg())
    groups = d.param_groups(0.1)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in d.trainable_parameters())
    assert all(g["lr"] == 0.1 for g in groups)


def test_registry_models_with_real_feature_hooks():
    torch.manual_seed(0)
    teacher = build_model("digits_cnn", num_classes=10, in_channels=1, width=1.0)
    student = build_model("digits_cnn", num_classes=10, in_channels=1, width=0.5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    d = D(student, teacher, GompertzSchedule(), cfg(gm=0.0))
    assert d.projector is not None and (d.projector.in_dim, d.projector.out_dim) == (32, 64)
    d.train()
    out = d(x, y, progress=0.9)
    out["total"].backward()
    assert torch.isfinite(out["total"]) and out["wasserstein"].item() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert student.features[0][0].weight.grad.abs().sum() > 0 and d.projector.linear.weight.grad.abs().sum() > 0
    assert not teacher.training and teacher.features[0][1].running_mean.abs().sum() == 0  # BN stats untouched
    d.remove_hooks()
    assert not student.fc._forward_pre_hooks and not teacher.fc._forward_pre_hooks
    assert d(x, y, progress=0.9)["wasserstein"].item() == 0.0


# --- peers -------------------------------------------------------------------------------------------


def test_dynamic_kd_controller_learns_from_kd_only():
    student, teacher, x, y = make()
    c = cfg(w=0.0, gm=0.0)
    params = DynamicKDParams(a=0.7, controller_lr_scale=3.0)
    d = D(student, teacher, ConstantSchedule(a=0.7), c, cls=DynamicKDDistiller, params=params)
    with torch.no_grad():
        d.log_c.fill_(0.4)
    out = d(x, y, progress=0.5)
    assert torch.isfinite(out["total"])
    assert out["entropy_scale"].item() == pytest.approx(torch.exp(torch.tensor(0.4)).item())
    assert_close(out["total"], recompute_total(out, c))
    out["total"].backward()
    assert d.log_c.grad is not None and d.log_c.grad.abs().item() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # the controller's gradient is exactly that of w * kd_weight * KD w.r.t. log c (CE contributes nothing)
    zs, zt = student(x).detach(), teacher(x).detach()
    log_c = torch.tensor(0.4, requires_grad=True)
    (ref_c,) = torch.autograd.grad(0.7 * kd_loss(log_c.exp() * zs, zt, c.losses.temperature), log_c)
    assert d.log_c.grad.item() == pytest.approx(ref_c.item(), rel=1e-5)

    # the student's gradient is that of the same objective with c held constant (no path through the controller)
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    z = student(x)
    c_const = torch.exp(torch.tensor(0.4)).item()
    (F.cross_entropy(z, y) + 0.7 * kd_loss(c_const * z, zt, c.losses.temperature)).backward()
    for g, p in zip(got, student.parameters()):
        assert_close(g, p.grad)

    groups = {g["name"]: g for g in d.param_groups(0.1)}
    assert groups["entropy_controller"]["lr"] == pytest.approx(0.3)
    assert groups["entropy_controller"]["weight_decay"] == 0.0
    assert groups["entropy_controller"]["params"] == [d.log_c]


def test_akd_alpha_cam_and_gradients():
    student, teacher, x, y = make()
    c = cfg(w=0.0, gm=0.0)
    d = D(student, teacher, ConstantSchedule(a=1.0), c, cls=AKDDistiller, params=AKDParams(beta=2.0, cam_hidden=8))
    out = d(x, y, progress=0.5)
    assert {"alpha", "cam"} <= set(out) and torch.isfinite(out["total"])
    zs, zt = student(x).detach(), teacher(x).detach()
    gap = F.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="batchmean")
    assert out["alpha"].item() == pytest.approx(1 - torch.exp(-2.0 * gap).item(), rel=1e-5)
    assert 0.0 < out["alpha"].item() < 1.0 and not out["alpha"].requires_grad
    # the CAM starts as the identity reweighting: KD~ equals plain KD
    assert out["kd"].item() == pytest.approx(kd_loss(zs, zt, c.losses.temperature).item(), rel=1e-5)
    a = out["alpha"]
    expected = 2 * a * out["ce"] + out["weight"] * 2 * (1 - a) * out["kd"] + out["cam"]  # total_weight 2: kd's scale
    assert_close(out["total"], expected)

    out["total"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert d.cam.mlp[2].weight.grad.abs().sum() > 0  # the zero-initialised layer learns
    # the student's gradient does not depend on the CAM objective (KD's target is detached)
    got = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    z = student(x)
    (2 * a * F.cross_entropy(z, y) + 2 * (1 - a) * kd_loss(z, zt, c.losses.temperature)).backward()
    for g, p in zip(got, student.parameters()):
        assert_close(g, p.grad)
    ids = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in ids for p in d.cam.parameters())


def _softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _kl(p, q):  # KL(p || q)
    return sum(a * math.log(a / b) for a, b in zip(p, q))


ZS = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.5]]  # a hand-sized case: 2 images, 3 classes
ZT = [[3.0, 0.0, -2.0], [-1.0, 2.5, 0.0]]
Y = [0, 2]


def _akd_by_hand(total_weight: float, alpha=None, T: float = 2.0, beta: float = 1.0):
    """AKD's objective computed with plain floats: CAM at its start (m = 1), the formulas of akd.py."""
    gap = sum(_kl(_softmax(t), _softmax(s)) for s, t in zip(ZS, ZT)) / 2
    alpha = 1 - math.exp(-beta * gap) if alpha is None else alpha
    ce = sum(-math.log(_softmax(s)[y]) for s, y in zip(ZS, Y)) / 2
    kd = T * T * sum(_kl(_softmax(t, T), _softmax(s, T)) for s, t in zip(ZS, ZT)) / 2
    cam = sum(-math.log(_softmax(t, T)[y]) for t, y in zip(ZT, Y)) / 2  # the CAM learns at the applied T
    return total_weight * alpha * ce + total_weight * (1 - alpha) * kd + cam, alpha, kd, cam


def _akd_objective(params: AKDParams):
    from gkd_core.methods.base import Batch, combine

    teacher = TinyNet(num_classes=3)
    d = AKDDistiller(TinyNet(num_classes=3), teacher, ConstantSchedule(a=1.0), LossesConfig(temperature=2.0),
                     weights={"kd": 1.0, "wasserstein": 0.0, "grad_match": 0.0}, params=params)
    zs, zt, y = torch.tensor(ZS, requires_grad=True), torch.tensor(ZT), torch.tensor(Y)
    ce = F.cross_entropy(zs, y)
    batch = Batch(x=torch.zeros(2, 12), y=y, progress=0.5, step=0, student_logits=zs, teacher_logits=zt, ce=ce)
    objective = d.method_objective(batch)
    total = combine(ce, 1.0, 1.0, objective.terms, d.weights, objective, True)
    return d, objective, total


def test_akd_objective_on_a_hand_computed_case():
    """total_weight 2 (kd's CE + 1 KD scale) and 1 (the paper's convex form); the CAM's CE at T = 2."""
    for s in (2.0, 1.0):
        _, objective, total = _akd_objective(AKDParams(total_weight=s))
        expected, alpha, kd, cam = _akd_by_hand(s)
        assert objective.metrics["alpha"].item() == pytest.approx(alpha, rel=1e-5)
        assert objective.terms["kd"].item() == pytest.approx(kd, rel=1e-5)
        assert objective.metrics["cam"].item() == pytest.approx(cam, rel=1e-5)
        assert total.item() == pytest.approx(expected, rel=1e-5)


def test_akd_learned_alpha_starts_at_a_half_and_trains_toward_the_smaller_loss():
    d, objective, total = _akd_objective(AKDParams(alpha="learned"))
    expected, _, kd, _ = _akd_by_hand(2.0, alpha=0.5)
    assert objective.metrics["alpha"].item() == pytest.approx(0.5) and total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    ce = sum(-math.log(_softmax(s)[y]) for s, y in zip(ZS, Y)) / 2
    # d total / d theta = s * alpha (1 - alpha) (CE - KD)
    assert d.alpha_logit.grad.item() == pytest.approx(2 * 0.25 * (ce - kd), rel=1e-5)
    groups = {g["name"]: g for g in d.param_groups(0.1)}
    assert groups["akd_alpha"]["params"] == [d.alpha_logit] and groups["akd_alpha"]["weight_decay"] == 0.0
    assert any(p is d.alpha_logit for p in d.method_parameters())
    assert _akd_objective(AKDParams())[0].alpha_logit is None  # the gap variant has no trained alpha


def test_akd_and_dynamic_kd_with_all_terms_are_finite():
    for cls in (DynamicKDDistiller, AKDDistiller):
        student, teacher, x, y = make()
        d = D(student, teacher, ConstantSchedule(), cfg(), cls=cls)
        d.train()
        out = d(x, y, progress=0.2)
        assert torch.isfinite(out["total"])
        out["total"].backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is not None for p in d.method_parameters())


def test_build_distiller_picks_the_class_and_checks_the_teacher():
    student, teacher, *_ = make()
    losses = cfg().losses
    expected = {"gompertz": Distiller, "kd": Distiller, "dynamic_kd": DynamicKDDistiller, "akd": AKDDistiller}
    for name, cls in expected.items():
        d = build_distiller(MethodConfig(name=name), losses, student, teacher, schedule=ConstantSchedule(), seed=1)
        assert type(d) is cls
    d = build_distiller(MethodConfig(name="none"), losses, student, None)
    assert type(d) is Distiller and d.teacher is None and isinstance(d.schedule, NoSchedule)
    for name in ("gompertz", "dynamic_kd", "akd"):
        with pytest.raises(ValueError, match="teacher"):
            build_distiller(MethodConfig(name=name), losses, student, None)
    d = build_distiller(MethodConfig(name="dynamic_kd", dynamic_kd={"controller_lr_scale": 2.0}), losses, student,
                        teacher)
    assert d.param_groups(1.0)[-1]["lr"] == pytest.approx(2.0)


@pytest.mark.slow
def test_compiled_student_with_input_grad_matching():
    # compiled graphs refuse double backward; the distiller runs the student eagerly on GM steps only
    student, teacher, x, y = make()
    student.compile(backend="aot_eager")
    d = D(student, teacher, ConstantSchedule(), cfg(every=2))
    d.train()
    for step in (0, 1):
        out = d(x, y, progress=0.5, step=step)
        out["total"].backward()
        assert torch.isfinite(out["total"]) and out["wasserstein"].item() > 0
        assert (out["grad_match"].item() > 0) == (step == 0)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# --- CES-KD ------------------------------------------------------------------------------------------


def test_ceskd_expert_index_curriculum():
    difficulty = torch.tensor([0.1, 3.0, 0.5, 2.0, 1.0, 0.2, 4.0, 0.3])
    start = expert_index(difficulty, 0.0, n_experts=3, pace=0.5)
    assert start.tolist() == [0] * 8  # at the start everyone learns from the smallest assistant
    end = expert_index(difficulty, 0.5, n_experts=3, pace=0.5)
    order = difficulty.argsort()
    assert end[order].tolist() == sorted(end.tolist())  # harder images never get a smaller expert
    assert end[order].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # the whole ladder is used, by difficulty
    mid = expert_index(difficulty, 0.25, n_experts=3, pace=0.5)
    assert mid.max() == 1 and (mid <= end).all()


def test_ceskd_routes_each_image_by_its_own_difficulty_against_the_reference():
    """By hand: reference difficulties 0.5, 1.0, 1.5, 2.0; the ladder fully open (3 experts): an image of
    difficulty 0.2 has 0 of 4 below it (expert 0), 1.2 has 2 (floor(0.5 * 3) = expert 1), 3.0 all 4 (expert 2).
    Its expert does not depend on its batch mates; ranked within the batch (the earlier reading) it does."""
    reference = torch.tensor([2.0, 0.5, 1.5, 1.0])
    assert expert_index(torch.tensor([0.2, 1.2, 3.0]), 1.0, 3, 0.5, reference).tolist() == [0, 1, 2]
    assert expert_index(torch.tensor([1.2, 1.2, 1.2, 1.2]), 1.0, 3, 0.5, reference).tolist() == [1, 1, 1, 1]
    assert expert_index(torch.tensor([1.2, 1.2, 1.2, 1.2]), 1.0, 3, 0.5).tolist() == [0, 0, 0, 0]  # batch ranks
    assert expert_index(torch.tensor([1.2, 5.0, 6.0, 7.0]), 1.0, 3, 0.5).tolist()[0] == 0  # same image, other mates


def test_ceskd_distiller_keeps_a_reference_of_recent_difficulties():
    torch.manual_seed(0)
    student, teacher, assistant = (build_model("digits_cnn", 10, 1, width=w) for w in (0.5, 2.0, 1.0))
    d = build_distiller(MethodConfig(name="ces_kd"), LossesConfig(), student, teacher,
                        train_alone=lambda model_cfg, label: assistant)
    d.train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    d(x, y, progress=1.0)
    assert int(d.reference_seen) == 16
    with torch.no_grad():
        difficulty = F.cross_entropy(teacher(x), y, reduction="none")
    assert torch.allclose(d.reference[:16], difficulty, atol=1e-6)
    # the second batch is routed against the first: the expert of each image by hand, KD against it
    x2, y2 = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with torch.no_grad():
        d2 = F.cross_entropy(teacher(x2), y2, reduction="none")
        below = torch.tensor([(difficulty < v).sum().item() for v in d2]).float() / 16
        k = (below * 2).floor().long().clamp(max=1)  # 2 experts: the assistant, the teacher
        experts = torch.stack([assistant(x2), teacher(x2)])
        chosen = experts[k, torch.arange(4)]
    out = d(x2, y2, progress=1.0)
    assert torch.allclose(out["kd"], kd_loss(out["logits"].detach(), chosen, 4.0), atol=1e-5)
    assert int(d.reference_seen) == 20 and "reference" in d.training_state()
    d.eval()
    d(x2, y2, progress=1.0)
    assert int(d.reference_seen) == 20  # validation does not feed the reference


def test_ceskd_distiller_uses_assistants_and_trains_student_only():
    torch.manual_seed(0)
    student = build_model("digits_cnn", 10, 1, width=0.5)
    teacher = build_model("digits_cnn", 10, 1, width=2.0)
    assistant = build_model("digits_cnn", 10, 1, width=1.0)
    calls = []
    assistant.register_forward_hook(lambda *a: calls.append(1))
    trained = []
    d = build_distiller(MethodConfig(name="ces_kd"), LossesConfig(),
                        student, teacher, train_alone=lambda model_cfg, label: trained.append(label) or assistant)
    assert trained == ["assistant[0]"]  # one assistant per entry of method.ces_kd.assistants
    d.train()
    assert not assistant.training and not teacher.training
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    out = d(x, y, progress=0.0)
    # at p = 0 every image learns from the assistant: KD equals KD against the assistant alone
    with torch.no_grad():
        expected = kd_loss(out["logits"], assistant(x), 4.0)
    assert torch.allclose(out["kd"], expected, atol=1e-6) and calls
    assert float(out["expert_level"]) == 0.0
    out["total"].backward()
    assert all(p.grad is None for p in list(teacher.parameters()) + list(assistant.parameters()))
    assert any(p.grad is not None for p in student.parameters())
    late = d(x, y, progress=1.0)
    assert 0.0 < float(late["expert_level"]) <= 1.0


def test_ceskd_refuses_an_inverted_ladder_in_one_line():
    student, teacher, assistant = (build_model("digits_cnn", 10, 1, width=w) for w in (0.5, 2.0, 1.0))
    accuracy = {id(teacher): 0.883, id(assistant): 0.895}  # the Fashion-MNIST sweep's ladder
    with pytest.raises(ValueError, match=r"^CES-KD's ladder is inverted: assistant\[0\] \(digits_cnn x1\) reaches "
                                         r"validation accuracy 0.8950, above the teacher's 0.8830; ") as err:
        build_distiller(MethodConfig(name="ces_kd"), LossesConfig(), student, teacher,
                        train_alone=lambda model_cfg, label: assistant, val_accuracy=lambda net: accuracy[id(net)])
    assert "\n" not in str(err.value)
    import typer

    from gkd_core.cli_support import run_cli

    lines = []
    with pytest.raises(typer.Exit) as exit_:  # on a command line: one line, exit 2 (bad input), no traceback
        run_cli(lambda: build_distiller(MethodConfig(name="ces_kd"), LossesConfig(), student, teacher,
                                        train_alone=lambda model_cfg, label: assistant,
                                        val_accuracy=lambda net: accuracy[id(net)]), report=lines.append)
    assert exit_.value.exit_code == 2 and len(lines) == 1 and lines[0].startswith("CES-KD's ladder is inverted")
    accuracy[id(assistant)] = 0.85  # a rising ladder builds
    d = build_distiller(MethodConfig(name="ces_kd"), LossesConfig(), student, teacher,
                        train_alone=lambda model_cfg, label: assistant, val_accuracy=lambda net: accuracy[id(net)])
    assert list(d.assistants) == [assistant]


def test_ceskd_without_assistants_is_refused():
    with pytest.raises(ValueError, match="assistant"):
        CESKDDistiller(build_model("digits_cnn", 10, 1), build_model("digits_cnn", 10, 1), ConstantSchedule())
    with pytest.raises(ValueError, match="train_alone"):  # nothing to train the ladder with
        build_distiller(MethodConfig(name="ces_kd"), LossesConfig(), build_model("digits_cnn", 10, 1),
                        build_model("digits_cnn", 10, 1))


# --- adding a method ---------------------------------------------------------------------------------


def test_a_new_method_is_one_module_plus_one_registry_line(monkeypatch, tmp_path):
    """The registry is the only dispatch: config, runner and engine take a new method without edits."""
    import toy_method

    from gkd_core.config import ConfigError, validate_params
    from gkd_core.data import prepare_dataset
    from gkd_core.runner import distill_student, train_teacher

    monkeypatch.setitem(METHODS, "toy", toy_method.SPEC)
    train = {"epochs": 1, "batch_size": 64, "lr": 0.05}
    raw = {
        "dataset": {"name": "digits", "limit": 200},
        "teacher": {"model": {"name": "digits_cnn"}, "train": train},
        "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "method": {"name": "toy", "toy": {"a": 0.25}},
        "runtime": {"device": "cpu", "progress_bar": False},
    }
    params = validate_params(raw)
    assert params.method.toy.a == 0.25 and params.method.toy.sharpen == 2.0  # the block, with its defaults
    with pytest.raises(ConfigError, match=r"method\.toy\.sharpen = -1: Input should be greater than 0"):
        validate_params({**raw, "method": {"name": "toy", "toy": {"sharpen": -1}}})

    data = prepare_dataset(params.dataset, params.seed)
    teacher = train_teacher(params, data).model
    result = distill_student(params, data, teacher)
    row = result.history[-1]
    assert result.summary["method"] == "toy" and row["weight"] == 0.25
    assert 0.0 < row["teacher_confidence"] <= 1.0 and row["train_kd"] > 0
    assert row["train_wasserstein"] == 0.0 and row["train_grad_match"] == 0.0  # terms it does not use

    monkeypatch.delitem(METHODS, "toy")
    with pytest.raises(ConfigError, match="method.name = 'toy'"):
        validate_params(raw)


def test_switching_the_wasserstein_estimator_is_not_silent(caplog):
    """emd/sinkhorn read the batch OT cost, ~10x the sliced value on 64-d features: the W weight tuned for one
    is not the same weight for the other, and the run says so."""
    student, teacher, *_ = make()
    with caplog.at_level("WARNING", logger="gkd_core.methods.base"):
        D(student, teacher, ConstantSchedule(), cfg(method="sliced"))
        assert not caplog.records
        D(student, teacher, ConstantSchedule(), cfg(method="emd"))
    assert "re-tune it on the validation split" in caplog.text and "'emd'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gkd_core.methods.base"):
        D(student, teacher, ConstantSchedule(), cfg(method="emd", w=0.0))  # W not used: nothing to say
    assert not caplog.records


def test_dose_matched_kd_weight_is_the_gompertz_schedules_mean():
    from gkd_core.methods import method_schedule
    from gkd_core.schedules import GompertzSchedule, schedule_mean

    student, teacher, x, y = make()
    method = MethodConfig(name="kd_dose_matched", gompertz={"a": 1.0, "b": 4.6052, "c": 7.6})
    d = build_distiller(method, cfg().losses, student, teacher)
    expected = schedule_mean(GompertzSchedule(a=1.0, b=4.6052, c=7.6))
    assert d.schedule.weight(0.0) == d.schedule.weight(1.0) == pytest.approx(expected)
    assert d(x, y, progress=0.5)["weight"].item() == pytest.approx(expected)
    assert d.terms == ("kd",)
    default = method_schedule(MethodConfig(name="kd_dose_matched")).weight(0.5)
    assert default == pytest.approx(schedule_mean(GompertzSchedule(b=4.6052, c=5.0906)))  # from method.gompertz
    assert default != pytest.approx(expected)


def test_gompertz_at_kd_dose_has_the_curves_shape_and_kds_mean_weight():
    """The dose control the other way round: method.gompertz's shape (b, c), scaled so the mean weight is kd's a."""
    from gkd_core.methods import method_schedule
    from gkd_core.schedules import GompertzSchedule, schedule_mean

    method = MethodConfig(name="gompertz_kd_dose_matched", gompertz={"a": 3.0, "b": 4.6052, "c": 7.6}, kd={"a": 0.8})
    schedule = method_schedule(method)
    assert schedule_mean(schedule) == pytest.approx(0.8, rel=1e-6)
    shape = GompertzSchedule(a=1.0, b=4.6052, c=7.6)  # gompertz's own a (3.0) plays no part: only its shape
    ratios = {round(schedule.weight(p) / shape.weight(p), 9) for p in (0.1, 0.3, 0.5, 0.9)}
    assert len(ratios) == 1 and ratios.pop() == pytest.approx(0.8 / schedule_mean(shape))
    student, teacher, *_ = make()
    assert build_distiller(method, cfg().losses, student, teacher).terms == ("kd",)


def test_kd_computes_neither_wasserstein_nor_gradient_matching():
    """`kd` is Hinton KD: the feature hooks are not even installed, the teacher runs under no_grad."""
    student, teacher, x, y = make()
    d = build_distiller(MethodConfig(name="kd"), cfg().losses, student, teacher)
    assert d.terms == ("kd",) and not d.use_wasserstein and not d.use_grad_match and d.projector is None
    assert not student.fc._forward_pre_hooks and not teacher.fc._forward_pre_hooks
    out = d(x, y, progress=0.5)
    zs, zt = student(x).detach(), teacher(x).detach()
    expected = F.cross_entropy(zs, y) + 1.0 * kd_loss(zs, zt, 4.0)
    assert_close(out["total"], expected)


def test_gradients_reach_the_right_parameters_per_method():
    """AKD's CAM and DynamicKD's controller learn; `gompertz` trains the projector; `kd` has no projector."""
    for name, own in (("akd", "cam"), ("dynamic_kd", "log_c"), ("gompertz", "projector")):
        student, teacher, x, y = make()
        d = build_distiller(MethodConfig(name=name), cfg().losses, student, teacher)
        d.train()
        d(x, y, progress=0.9)["total"].backward()
        part = getattr(d, own)
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
        assert all(p.grad is None for p in teacher.parameters()), name
        assert all(p.grad is not None for p in student.body.parameters()), name
