"""benchmarks/gpu_throughput.py on CPU with tiny settings: every configuration runs and reports finite figures."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "benchmarks" / "gpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_throughput"] = module
    spec.loader.exec_module(module)
    return module


def tiny(bench, **kw):
    base = dict(device="cpu", teacher="digits_cnn", student="digits_cnn", classes=10, size=8, n_train=16, batch=8,
                epochs=1, warmup_epochs=1, workers=0, gm_every=(1, 2), compile=False)
    return bench.Settings(**{**base, **kw})


def test_every_configuration_reports_finite_figures(bench, monkeypatch):
    calls = []
    real_fit = bench.fit
    monkeypatch.setattr(bench, "fit", lambda *a: calls.append(a[4].desc) or real_fit(*a))
    result = bench.run_benchmark(tiny(bench))
    names = [m.name for m in result.measurements]
    assert names == ["ref_kd", "fast_kd", "fast_kd_w", "fast_kd_w_gm1", "fast_kd_w_gm2", "fast_kd_noaug",
                     "fast_kd_noaug_cached", "ref_teacher", "fast_teacher"]
    assert calls == [n for n in names if n.startswith("fast")]  # (b)-(e) go through gkd_core's engine
    for m in result.measurements:
        assert math.isfinite(m.images_per_s) and m.images_per_s > 0, m
        assert m.timed_images == 16 and len(m.epoch_seconds) == 1 and m.warmup_seconds > 0
        assert math.isfinite(m.projected_240_s) and m.projected_240_s > 0
        assert math.isfinite(m.ratio_to_reference) and m.ratio_to_reference > 0
        assert m.peak_memory_mib is None  # CPU: no device memory counter
        assert math.isfinite(m.extra["final_train_loss"])
    by = {m.name: m for m in result.measurements}
    assert by["ref_kd"].ratio_to_reference == 1.0 and by["ref_teacher"].ratio_to_reference == 1.0
    assert by["fast_teacher"].ratio_to_reference == pytest.approx(
        by["fast_teacher"].images_per_s / by["ref_teacher"].images_per_s)
    assert by["fast_kd_noaug_cached"].extra["cache_seconds"] > 0
    goals = [g["goal"] for g in result.goals]
    assert len(goals) == 1 + 2 + 3 and all(isinstance(g["met"], bool) for g in result.goals)
    report = bench.format_report(result)
    for m in result.measurements:
        assert m.label in report
    assert "goals:" in report and "240 ep." in report
    blob = json.loads(json.dumps(bench.to_json(result)))
    assert blob["settings"]["num_classes"] == 10 and blob["environment"]["torch"]


def test_subset_of_configurations_and_unknown_names(bench):
    result = bench.run_benchmark(tiny(bench, configs=("fast_kd",), gm_every=(3,)))
    assert [m.name for m in result.measurements] == ["fast_kd"]
    assert result.measurements[0].ratio_to_reference is None and result.goals[-1]["goal"].endswith("(fast_kd)")
    with pytest.raises(ValueError, match="unknown configuration"):
        bench.run_benchmark(tiny(bench, configs=("fast_kd", "nope")))


def test_quick_flag_and_data_helpers(bench):
    s, _ = bench.parse_args(["--device", "cpu", "--quick", "--gm-every", "1", "4"])
    assert (s.n_train, s.size, s.epochs, s.warmup_epochs, s.compile) == (32, 8, 1, 1, False)
    assert s.gm_every == (1, 4) and s.teacher == "resnet32x4" and s.student == "resnet8x4"
    s, _ = bench.parse_args(["--device", "cpu", "--quick", "--n-train", "40"])
    assert s.n_train == 40
    data = bench.synthetic_data(20, 8, 100)
    assert tuple(data.train_x.shape) == (20, 3, 8, 8) and data.num_classes == 100
    assert int(data.train_y.max()) < 100
    x, y = bench.ReferenceDataset(data.train_x, data.train_y, bench.reference_transform(data))[0]
    assert tuple(x.shape) == (3, 8, 8) and isinstance(y, int)
