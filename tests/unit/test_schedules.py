import math

import pytest

from gkd_core.schedules import (
    SCHEDULES,
    AdaptiveGompertzSchedule,
    ConstantSchedule,
    CosineSchedule,
    GompertzSchedule,
    LinearSchedule,
    LogisticSchedule,
    NoSchedule,
    build_schedule,
    schedule_curve,
    schedule_mean,
)


def test_gompertz_known_values():
    s = GompertzSchedule(a=2.0, b=3.0, c=5.0)
    assert s.weight(0.0) == pytest.approx(2.0 * math.exp(-3.0))
    assert s.weight(1.0) == pytest.approx(2.0 * math.exp(-3.0 * math.exp(-5.0)))
    # at the inflection ln(b)/c the curve is at a/e
    assert s.weight(math.log(3.0) / 5.0) == pytest.approx(2.0 / math.e)


def test_gompertz_reference_table():
    # docs/method.md table: w0 = 0.01a, p* = 0.3 -> w(.1, .3, .5, 1.0) = .06 .37 .70 .97 (fractions of a)
    s = GompertzSchedule.from_shape(w_max=1.0, w0=0.01, p_inflection=0.3)
    assert [round(s.weight(p), 2) for p in (0.0, 0.1, 0.3, 0.5, 1.0)] == [0.01, 0.06, 0.37, 0.70, 0.97]


@pytest.mark.parametrize("w_max,w0,p_star", [(1.0, 0.01, 0.3), (2.5, 0.1, 0.5), (0.7, 1e-4, 0.9)])
def test_gompertz_shape_parameterisation_round_trips(w_max, w0, p_star):
    s = GompertzSchedule.from_shape(w_max, w0, p_star)
    assert s.a == pytest.approx(w_max)
    assert s.w0 == pytest.approx(w0)
    assert s.weight(0.0) == pytest.approx(w0)
    assert s.p_inflection == pytest.approx(p_star)
    assert s.weight(p_star) == pytest.approx(w_max / math.e)


def test_gompertz_is_slow_fast_saturating():
    s = GompertzSchedule.from_shape(1.0, 0.01, 0.3)
    ps, ws = schedule_curve(s, 101)
    diffs = [b - a for a, b in zip(ws, ws[1:])]
    assert all(d > 0 for d in diffs)  # monotone increasing
    peak = max(range(len(diffs)), key=diffs.__getitem__)
    assert 0.25 <= ps[peak] <= 0.35  # steepest near p* = 0.3
    assert diffs[0] < diffs[peak] / 5 and diffs[-1] < diffs[peak] / 5  # slow start, saturation


@pytest.mark.parametrize("bad", [dict(w0=0.0), dict(w0=0.5), dict(p_inflection=0.0), dict(p_inflection=1.5)])
def test_gompertz_shape_rejects_impossible_curves(bad):
    kwargs = dict(w_max=1.0, w0=0.01, p_inflection=0.3) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        GompertzSchedule.from_shape(**kwargs)


def test_baselines():
    assert NoSchedule().weight(0.7) == 0.0 and not NoSchedule().enabled
    assert ConstantSchedule(a=0.9).weight(0.0) == 0.9
    lin = LinearSchedule(a=2.0, warmup=0.25)
    assert [lin.weight(p) for p in (0.0, 0.125, 0.25, 1.0)] == [0.0, 1.0, 2.0, 2.0]
    cos = CosineSchedule(a=1.0, warmup=0.5)
    assert cos.weight(0.0) == pytest.approx(0.0) and cos.weight(0.25) == pytest.approx(0.5)
    assert cos.weight(0.5) == pytest.approx(1.0) and cos.weight(0.9) == pytest.approx(1.0)
    log = LogisticSchedule(a=1.0, k=10.0, p0=0.4)
    assert log.weight(0.4) == pytest.approx(0.5)
    assert log.weight(0.0) == pytest.approx(1 / (1 + math.exp(4.0)))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_state_dict_round_trip(name):
    src = build_schedule(name)
    for f in ("a", "b", "c", "warmup", "k", "p0"):
        if hasattr(src, f):
            setattr(src, f, getattr(src, f) * 0.5 + 0.1)
    dst = build_schedule(name)
    dst.load_state_dict(src.state_dict())
    assert [dst.weight(p) for p in (0.0, 0.3, 1.0)] == [src.weight(p) for p in (0.0, 0.3, 1.0)]


def test_state_dict_restores_floats_into_a_schedule_built_with_ints():
    """A schedule built with integer parameters took the loaded floats' int() (b=4.6 -> 4): not any more."""
    s = GompertzSchedule(a=2, b=1, c=1)
    s.load_state_dict(GompertzSchedule().state_dict())
    assert (s.a, s.b, s.c) == (1.0, GompertzSchedule().b, GompertzSchedule().c)
    assert isinstance(s.b, float) and s.weight(0.3) == GompertzSchedule().weight(0.3)


def test_schedule_mean_is_the_dose():
    assert schedule_mean(ConstantSchedule(a=0.7)) == pytest.approx(0.7)
    assert schedule_mean(GompertzSchedule()) == pytest.approx(0.5918, abs=1e-4)  # the default's mean weight
    lin = LinearSchedule(a=1.0, warmup=0.5)
    assert schedule_mean(lin) == pytest.approx(0.75, abs=1e-6)


def test_adaptive_gompertz_uses_the_prior_then_the_students_curve():
    s = AdaptiveGompertzSchedule(a=1.0, min_points=3)
    prior = (s.b, s.c)
    truth = (0.95, 3.0, 8.0)  # a student curve: accuracy 0.95 exp(-3 exp(-8 p)), inflection at p* = ln(3)/8

    def acc(p):
        return truth[0] * math.exp(-truth[1] * math.exp(-truth[2] * p))

    for p in (0.1, 0.2):
        s.observe(p, {"val_accuracy": acc(p)})
    assert (s.b, s.c) == prior  # not enough points yet
    s.observe(0.3, {"train_total": 1.0})  # an epoch without validation changes nothing
    assert len(s.observations) == 2
    for p in (0.3, 0.5, 0.7, 0.9):
        s.observe(p, {"val_accuracy": acc(p)})
    assert s.b == pytest.approx(truth[1], rel=1e-3) and s.c == pytest.approx(truth[2], rel=1e-3)
    assert s.p_inflection == pytest.approx(math.log(3.0) / 8.0, rel=1e-3)
    assert s.weight(s.p_inflection) == pytest.approx(1.0 / math.e)  # the weight now rises with the student
    restored = AdaptiveGompertzSchedule()
    restored.load_state_dict(s.state_dict())
    assert restored == s and restored.weight(0.4) == s.weight(0.4)


def test_adaptive_gompertz_fit_stays_in_bounds_on_a_flat_curve():
    s = AdaptiveGompertzSchedule(min_points=3)
    for p in (0.1, 0.2, 0.3, 0.4):
        s.observe(p, {"val_accuracy": 0.98})  # digits: saturated after one epoch
    lo_b, hi_b = AdaptiveGompertzSchedule.B_BOUNDS
    lo_c, hi_c = AdaptiveGompertzSchedule.C_BOUNDS
    assert lo_b <= s.b <= hi_b and lo_c <= s.c <= hi_c and 0.0 < s.weight(0.0) <= s.weight(1.0) <= 1.0


def test_state_dict_refuses_another_schedule():
    with pytest.raises(ValueError, match="gompertz"):
        LinearSchedule().load_state_dict(GompertzSchedule().state_dict())


def test_build_schedule_errors_and_shape_kwargs():
    with pytest.raises(ValueError, match="allowed: none, constant"):
        build_schedule("exponential")
    s = build_schedule("gompertz", w_max=2.0, w0=0.02, p_inflection=0.4)
    assert s.weight(0.0) == pytest.approx(0.02) and s.p_inflection == pytest.approx(0.4)


@pytest.mark.parametrize("p", [-0.1, 1.01, float("nan")])
def test_progress_out_of_range(p):
    with pytest.raises(ValueError, match="progress"):
        GompertzSchedule().weight(p)

