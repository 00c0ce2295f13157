import math

import pytest

from gkd_core.schedules import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    GompertzSchedule,
    LinearSchedule,
    LogisticSchedule,
    NoSchedule,
    build_schedule,
    schedule_curve,
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


def test_state_dict_refuses_another_schedule():
    with pytest.raises(ValueError, match="gompertz"):
        LinearSchedule().load_state_dict(GompertzSchedule().state_dict())


def test_build_schedule_errors_and_shape_kwargs():
    with pytest.raises(ValueError, match="allowed: none, kd"):
        build_schedule("exponential")
    s = build_schedule("gompertz", w_max=2.0, w0=0.02, p_inflection=0.4)
    assert s.weight(0.0) == pytest.approx(0.02) and s.p_inflection == pytest.approx(0.4)


@pytest.mark.parametrize("p", [-0.1, 1.01, float("nan")])
def test_progress_out_of_range(p):
    with pytest.raises(ValueError, match="progress"):
        GompertzSchedule().weight(p)

