import copy
import math

import pytest
import torch
from plain_trainable import PlainTrainable
from torch import nn

from gkd_core.config import TrainConfig, validate_params
from gkd_core.data import prepare_dataset
from gkd_core.engine import FitOptions, NonFiniteLossError, Trainable, fit, lr_factor, progress_at, resolve_device
from gkd_core.runner import distill_student, run_fingerprint, train_teacher


def tiny_params(**method):
    train = {"epochs": 2, "batch_size": 64, "lr": 0.05, "optimizer": "sgd"}
    return validate_params({
        "seed": 3,
        "dataset": {"name": "digits", "limit": 400},
        "teacher": {"model": {"name": "digits_cnn", "width": 1.0}, "train": train},
        "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "method": {"name": "gompertz", **method,
                   "gompertz": {"weights": {"kd": 1.0, "wasserstein": 0.5, "grad_match": 0.5}}},
        "runtime": {"device": "cpu", "progress_bar": False},
    })


@pytest.fixture(scope="module")
def digits_small():
    return prepare_dataset(tiny_params().dataset, seed=3)


def test_lr_factor_shapes():
    cos = TrainConfig(epochs=10, lr_schedule="cosine")
    assert lr_factor(0, 100, cos, 10) == pytest.approx(1.0)
    assert lr_factor(50, 100, cos, 10) == pytest.approx(0.5)
    ms = TrainConfig(epochs=10, lr_schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, 100, ms, 10) for s in (49, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])
    warm = TrainConfig(epochs=10, warmup_epochs=2, lr_schedule="constant")
    assert lr_factor(0, 100, warm, 10) == pytest.approx(1 / 20) and lr_factor(20, 100, warm, 10) == 1.0


def test_progress_granularity():
    assert progress_at(0, 0, 100, 10, "step") == 0.0 and progress_at(99, 9, 100, 10, "step") == 1.0
    assert progress_at(55, 5, 100, 10, "epoch") == pytest.approx(5 / 9)


def test_resolve_device_refuses_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nothing to refuse")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, digits_small):
    """Train 2 epochs; separately train 1 epoch, drop every object, resume from the checkpoint: identical."""
    params = tiny_params()
    teacher = train_teacher(params, digits_small).model
    full = distill_student(params, digits_small, teacher, checkpoint_path=tmp_path / "full.ckpt")

    ckpt = tmp_path / "part.ckpt"
    first = distill_student(params, digits_small, teacher, checkpoint_path=ckpt, stop_after_epochs=1)
    assert len(first.history) == 1 and ckpt.is_file()
    resumed = distill_student(params, digits_small, teacher, checkpoint_path=ckpt)
    assert resumed.summary["resumed_from_epoch"] == 1

    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in h]
    assert strip(full.history) == strip(resumed.history)
    assert full.history[-1]["train_grad_match"] > 0 and full.history[-1]["train_wasserstein"] > 0


def test_checkpoint_of_another_config_is_not_resumed(tmp_path, digits_small):
    params = tiny_params()
    ckpt = tmp_path / "t.ckpt"
    train_teacher(params, digits_small, checkpoint_path=ckpt, stop_after_epochs=1)
    other = params.model_copy(update={"seed": 4})
    result = train_teacher(other, digits_small, checkpoint_path=ckpt)
    assert result.summary["resumed_from_epoch"] is None and len(result.history) == 2


def test_a_teacher_resumes_after_an_edit_of_the_distillation_losses(tmp_path, digits_small):
    """The teacher trains without distillation terms: a ``losses`` edit (e.g. for the students) keeps its
    checkpoint; a distilled student's checkpoint does depend on ``losses``."""
    params = tiny_params()
    ckpt = tmp_path / "t.ckpt"
    train_teacher(params, digits_small, checkpoint_path=ckpt, stop_after_epochs=1)
    edited = params.model_copy(update={"losses": params.losses.model_copy(update={"temperature": 2.0})})
    result = train_teacher(edited, digits_small, checkpoint_path=ckpt)
    assert result.summary["resumed_from_epoch"] == 1

    fp = lambda p: run_fingerprint("s", p.student, p.method, p, digits_small)  # noqa: E731
    assert fp(params) != fp(edited)


class _Explodes(PlainTrainable):
    """A minimal trainable of the engine's contract (no distiller): its loss turns NaN at step 3."""

    metric_names = {"total": "train_total", "ce": "train_ce"}

    def __init__(self, bad_step=3, how="loss"):
        super().__init__()
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.bad_step, self.how = bad_step, how

    def forward(self, x, y, progress, step=0):
        logits = self.student(x)
        ce = nn.functional.cross_entropy(logits, y)
        if step >= self.bad_step and self.how == "loss":
            ce = ce * math.nan
        if step >= self.bad_step and self.how == "gradient":  # value 0, gradient NaN: sqrt'(0) * 0
            ce = ce + (self.student[1].weight.sum() * 0).abs().sqrt()
        return {"total": ce, "ce": ce, "logits": logits}


def test_any_module_keeping_the_contract_trains():
    assert isinstance(_Explodes(), Trainable)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 32, 16)]
    result = fit(_Explodes(), batches, None, TrainConfig(epochs=1), FitOptions(progress_bar=False))
    assert set(result.history[0]) >= {"train_total", "train_ce", "train_accuracy", "lr"}


@pytest.mark.parametrize("guard", ["sync", "device"])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_no_non_finite_update_is_ever_applied(guard, where):
    """The loss (or only its gradient) turns NaN at step 3 (the 4th): the run stops naming that step and the
    term, and the weights are exactly those after steps 0-2: no update from the bad step on. ``device`` keeps
    the check on the device (fused optimizer skip) and reads it every ``guard_every`` steps."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)]
    options = FitOptions(guard=guard, guard_every=5, progress_bar=False)
    cfg = TrainConfig(epochs=1, lr=0.05, lr_schedule="constant")
    torch.manual_seed(1)
    reference = _Explodes(bad_step=10**6, how=where)
    start = copy.deepcopy(reference.state_dict())
    fit(reference, batches[:3], None, cfg, options)  # the 3 clean steps alone
    torch.manual_seed(1)
    model = _Explodes(bad_step=3, how=where)
    assert all(torch.equal(a, b) for a, b in zip(start.values(), model.state_dict().values()))
    expected = "non-finite loss term total, ce" if where == "loss" else "non-finite gradient"
    with pytest.raises(NonFiniteLossError, match=rf"training stopped at step 4: {expected}"):
        fit(model, batches, None, cfg, options)
    for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k  # exactly the weights after the 3 clean steps


def test_callbacks_receive_every_metric(digits_small):
    seen = []
    params = tiny_params()
    train_teacher(params, digits_small, callbacks=[lambda n, v, s: seen.append((n, s))])
    names = {n for n, _ in seen}
    assert {"train_total", "train_ce", "train_accuracy", "val_accuracy", "lr", "weight"} <= names
    assert {s for _, s in seen} == {1, 2}


def test_the_best_validation_epoch_is_kept_and_survives_a_resume(tmp_path, digits_small):
    params = tiny_params()
    params = params.model_copy(update={"student": params.student.model_copy(
        update={"train": params.student.train.model_copy(update={"epochs": 3})})})
    teacher = train_teacher(params, digits_small).model
    full = distill_student(params, digits_small, teacher)
    vals = [r["val_accuracy"] for r in full.history]
    best_epoch = vals.index(max(vals)) + 1
    assert full.summary["best_val_epoch"] == best_epoch and full.best_model is not None
    from gkd_core.runner import evaluate_model
    assert evaluate_model(full.best_model, digits_small, "val", device="cpu")["accuracy"] == pytest.approx(max(vals))
    ckpt = tmp_path / "part.ckpt"
    distill_student(params, digits_small, teacher, checkpoint_path=ckpt, stop_after_epochs=best_epoch)
    resumed = distill_student(params, digits_small, teacher, checkpoint_path=ckpt)
    assert resumed.summary["best_val_epoch"] == best_epoch
    for a, b in zip(full.best_model.state_dict().values(), resumed.best_model.state_dict().values()):
        assert torch.equal(a, b)
