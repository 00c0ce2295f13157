"""Cached teacher outputs (runtime.cache_teacher): loaders with row numbers, the cache, the engine, the config."""

import math

import pytest
import torch

from gkd_core.config import ConfigError, LossesConfig, TrainConfig, validate_params
from gkd_core.data import DeviceLoader, PreparedData, TorchLoader, channel_stats, normalise, prepare_dataset
from gkd_core.engine import FitOptions, fit
from gkd_core.methods import Distiller, TeacherCache, compute_teacher_cache
from gkd_core.models import build_model
from gkd_core.runner import distill_student
from gkd_core.schedules import ConstantSchedule

SCALARS = ("total", "ce", "kd", "wasserstein", "grad_match")
N, C, SIZE, CLASSES = 48, 3, 8, 5


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (N, C, SIZE, SIZE), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    mean, std = channel_stats(x)
    return x, y, mean, std


def losses(variant="logit", gm=0.5, w=0.5):
    """(loss settings, term weights) of the full objective."""
    return LossesConfig(grad_match={"variant": variant}), {"kd": 1.0, "wasserstein": w, "grad_match": gm}


def make_teacher():
    torch.manual_seed(1)
    return build_model("digits_cnn", CLASSES, in_channels=C, width=1.0).eval()


def make_distiller(teacher, cfg=None):
    torch.manual_seed(2)  # the same student initialisation in every run
    student = build_model("digits_cnn", CLASSES, in_channels=C, width=0.5)
    settings, weights = cfg or losses()
    return Distiller(student, teacher, ConstantSchedule(), settings, weights=weights, seed=5)


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def loader(images, **kw):
    x, y, mean, std = images
    return DeviceLoader(x, y, mean, std, batch_size=16, shuffle=True, augment=False, drop_last=True, seed=3,
                        with_index=True, **kw)


def test_loaders_yield_row_numbers_identically(images):
    x, y, mean, std = images
    m, s = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    dev = loader(images)
    tl = TorchLoader(x, y, mean, std, batch_size=16, shuffle=True, augment=False, drop_last=True, seed=3,
                     with_index=True)
    seen = []
    for (xb, yb, idx), (xt, yt, it) in zip(dev, tl):
        assert idx.dtype == torch.int64 and torch.equal(idx, it)
        assert torch.equal(yb, y[idx]) and torch.equal(yt, yb)
        assert torch.equal(xb, normalise(x[idx], m, s)) and torch.equal(xt, xb)
        seen += idx.tolist()
    assert sorted(seen) == list(range(N))
    plain = DeviceLoader(x, y, mean, std, batch_size=16)
    assert all(len(batch) == 2 for batch in plain)


def test_cache_matches_the_online_teacher_and_is_batch_independent(images):
    x, y, mean, std = images
    teacher = make_teacher()
    cache = compute_teacher_cache(teacher, x, mean, std, "cpu", batch_size=7)
    assert isinstance(cache, TeacherCache) and len(cache) == N
    assert cache.logits.shape == (N, CLASSES) and cache.features.shape == (N, teacher.feature_dim)
    assert not cache.logits.is_inference() and not cache.features.is_inference()
    with torch.no_grad():
        ref = teacher(normalise(x, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)))
    assert torch.allclose(cache.logits, ref, rtol=1e-5, atol=1e-5)
    assert not teacher._forward_pre_hooks and not teacher.fc._forward_pre_hooks  # its hook was removed
    assert compute_teacher_cache(teacher, x, mean, std, "cpu", features=False).features is None


def test_cached_run_gives_the_same_losses_and_never_calls_the_teacher(images):
    """Augmentation off: the first optimizer steps with the cache equal those with the online teacher."""
    x, y, mean, std = images
    teacher = make_teacher()
    runs = {}
    for cached in (False, True):
        d = make_distiller(teacher)
        if cached:
            d.attach_teacher_cache(compute_teacher_cache(teacher, x, mean, std, "cpu", batch_size=11))
        calls, handle = count_calls(teacher)
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
        rows = []
        for step, (xb, yb, idx) in zip(range(3), loader(images)):
            out = d(xb, yb, progress=0.5, step=step, index=idx)
            opt.zero_grad()
            out["total"].backward()
            opt.step()
            rows.append(torch.stack([out[k].detach() for k in SCALARS]))
        handle.remove()
        runs[cached] = (torch.stack(rows), len(calls))
    (online, online_calls), (cached, cached_calls) = runs[False], runs[True]
    assert online_calls == 3 and cached_calls == 0
    assert (online[:, SCALARS.index("kd")] > 0).all() and (online[:, SCALARS.index("wasserstein")] > 0).all()
    assert (online[:, SCALARS.index("grad_match")] > 0).all()
    assert torch.allclose(online, cached, rtol=1e-4, atol=1e-6), (online, cached)


def test_engine_passes_row_numbers_and_matches_the_uncached_fit(images):
    x, y, mean, std = images
    teacher = make_teacher()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment=False)
    histories = {}
    for cached in (False, True):
        d = make_distiller(teacher)
        if cached:
            d.attach_teacher_cache(compute_teacher_cache(teacher, x, mean, std, "cpu"))
        calls, handle = count_calls(teacher)
        result = fit(d, loader(images), None, cfg, FitOptions(progress_bar=False))
        handle.remove()
        histories[cached] = (result.history, len(calls))
    (online, online_calls), (cached, cached_calls) = histories[False], histories[True]
    assert online_calls == 2 * (N // 16) and cached_calls == 0
    for a, b in zip(online, cached):
        for k in ("train_total", "train_kd", "train_wasserstein", "train_grad_match", "train_accuracy"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])


def test_fit_puts_the_teacher_in_channels_last_too(images):
    teacher = make_teacher()
    d = make_distiller(teacher)
    fit(d, loader(images), None, TrainConfig(epochs=1, batch_size=16, augment=False),
        FitOptions(channels_last=True, progress_bar=False))
    conv = teacher.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_cache_refused_where_it_cannot_work(images):
    x, y, mean, std = images
    teacher = make_teacher()
    cache = compute_teacher_cache(teacher, x, mean, std, "cpu")
    with pytest.raises(ValueError, match="input gradient"):
        make_distiller(teacher, losses(variant="input")).attach_teacher_cache(cache)
    with pytest.raises(ValueError, match="features"):
        make_distiller(teacher).attach_teacher_cache(TeacherCache(cache.logits, None))
    alone = Distiller(build_model("digits_cnn", CLASSES, in_channels=C), None, ConstantSchedule())
    with pytest.raises(ValueError, match="teacher"):
        alone.attach_teacher_cache(cache)
    d = make_distiller(teacher, losses(variant="input", gm=0.0))  # GM off: fine
    d.attach_teacher_cache(cache)
    assert d.teacher_cache is cache
    d.attach_teacher_cache(None)
    assert d.teacher_cache is None


def test_input_gm_step_with_a_cache_runs_the_teacher(images):
    """Should a cache be attached while input GM is on (bypassing attach's check), GM steps still work."""
    x, y, mean, std = images
    teacher = make_teacher()
    d = make_distiller(teacher, losses(variant="input"))
    d._teacher_cache = compute_teacher_cache(teacher, x, mean, std, "cpu")
    xb, yb, idx = next(iter(loader(images)))
    out = d(xb, yb, progress=0.5, step=0, index=idx)
    assert out["grad_match"].item() > 0


def params(**runtime):
    train = {"epochs": 1, "batch_size": 32, "augment": False}
    return {
        "seed": 1,
        "dataset": {"name": "digits", "limit": 200},
        "teacher": {"model": {"name": "digits_cnn", "width": 1.0}, "train": train},
        "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "method": {"name": "gompertz", "gompertz": {"weights": {"wasserstein": 0.5, "grad_match": 0.5}}},
        "losses": {"grad_match": {"variant": "logit"}},
        "runtime": {"device": "cpu", "progress_bar": False, **runtime},
    }


def test_config_refuses_cache_with_input_gm_or_augmentation():
    p = params(cache_teacher=True)
    assert validate_params(p).runtime.cache_teacher is True
    p["losses"]["grad_match"]["variant"] = "input"
    with pytest.raises(ConfigError) as err:
        validate_params(p)
    assert "runtime.cache_teacher" in str(err.value) and "input gradient" in str(err.value)
    p["method"]["gompertz"]["weights"]["grad_match"] = 0.0
    validate_params(p)  # input variant with weight 0 is no gradient matching at all
    p["method"]["name"] = "kd"
    p["method"]["gompertz"]["weights"]["grad_match"] = 1.0
    validate_params(p)  # nor is a method without gradient matching
    p["method"]["name"] = "gompertz"
    p["method"]["gompertz"]["weights"]["grad_match"] = 0.0
    p["student"]["train"] = {"augment": True}
    with pytest.raises(ConfigError, match="student.train.augment"):
        validate_params(p)
    p["student"]["train"] = {"augment": True, "crop_padding": 0, "hflip": False}  # augmentation that does nothing
    validate_params(p)
    p["runtime"]["cache_teacher"] = False
    p["student"]["train"] = {"augment": True}
    p["method"]["gompertz"]["weights"]["grad_match"] = 1.0
    validate_params(p)


def test_runner_distils_with_a_cached_teacher():
    online_p, cached_p = validate_params(params()), validate_params(params(cache_teacher=True))
    data = prepare_dataset(online_p.dataset, seed=1)
    teacher = make_digits_teacher(data)
    calls, handle = count_calls(teacher)
    online = distill_student(online_p, data, teacher)
    online_calls = len(calls)
    cached = distill_student(cached_p, data, teacher)
    handle.remove()
    assert len(calls) - online_calls == math.ceil(len(data.train_y) / 512)  # the cache pass, nothing else
    assert online_calls == len(data.train_y) // 32
    a, b = online.history[0], cached.history[0]
    for k in ("train_total", "train_kd", "train_wasserstein", "train_grad_match"):
        assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
    assert cached.model is not None and not teacher._forward_pre_hooks


def make_digits_teacher(data: PreparedData):
    torch.manual_seed(4)
    return build_model("digits_cnn", data.num_classes, in_channels=data.in_channels, width=1.0).eval()


@pytest.mark.slow
def test_compiled_teacher_and_student_with_input_grad_matching(images):
    """fit(compile=True) compiles the teacher too; its input gradient (GM steps) must still flow."""
    teacher = make_teacher()
    d = make_distiller(teacher, losses(variant="input"))
    d.student.compile(backend="aot_eager")
    teacher.compile(backend="aot_eager")
    d.train()
    for step, (xb, yb, _) in zip(range(2), loader(images)):
        out = d(xb, yb, progress=0.5, step=step)
        out["total"].backward()
        assert torch.isfinite(out["total"]) and out["grad_match"].item() > 0 and out["wasserstein"].item() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in d.student.parameters())


def test_a_saved_cache_replaces_the_cache_pass_and_is_refused_when_it_does_not_match(tmp_path):
    """A sweep computes the cache once (save_teacher_cache) and its points read it: the same run as computing
    its own, with no teacher forward; a cache of another teacher or data, or a file that is not one, is not
    used (the run computes its own)."""
    from gkd_core.methods import load_teacher_cache, save_teacher_cache

    p = validate_params(params(cache_teacher=True))
    data = prepare_dataset(p.dataset, seed=1)
    teacher = make_digits_teacher(data)
    meta = {"teacher_sha256": "t", "data_sha256": "d"}
    file = tmp_path / "teacher_cache.pt"
    save_teacher_cache(compute_teacher_cache(teacher, data.train_x, data.mean, data.std, "cpu"), file, meta)
    own = distill_student(p, data, teacher)
    calls, handle = count_calls(teacher)
    shared = distill_student(p, data, teacher, teacher_cache=(file, meta))
    handle.remove()
    assert not calls  # not one teacher forward: the cache came from the file
    assert [r["train_total"] for r in own.history] == [r["train_total"] for r in shared.history]
    for a, b in zip(own.model.state_dict().values(), shared.model.state_dict().values()):
        assert torch.equal(a, b)
    n = len(data.train_y)
    assert load_teacher_cache(file, {**meta, "teacher_sha256": "other"}, n, "cpu", features=True) is None
    assert load_teacher_cache(file, meta, n + 1, "cpu", features=True) is None
    save_teacher_cache(TeacherCache(torch.zeros(n, 10)), file, meta)  # no features: fine for KD, not for W
    assert load_teacher_cache(file, meta, n, "cpu", features=False) is not None
    assert load_teacher_cache(file, meta, n, "cpu", features=True) is None
    file.write_bytes(b"not a torch file")
    assert load_teacher_cache(file, meta, n, "cpu", features=False) is None
