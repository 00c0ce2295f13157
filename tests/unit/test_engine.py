import math

import pytest
import torch
from torch import nn

from gkd_core.config import TrainConfig, validate_params
from gkd_core.data import prepare_dataset
from gkd_core.engine import FitOptions, NonFiniteLossError, Trainable, fit, lr_factor, progress_at, resolve_device
from gkd_core.runner import distill_student, train_teacher


def tiny_params(**method):
    train = {"epochs": 2, "batch_size": 64, "lr": 0.05, "optimizer": "sgd"}
    return validate_params({
        "seed": 3,
        "dataset": {"name": "digits", "limit": 400},
        "teacher": {"model": {"name": "digits_cnn", "width": 1.0}, "train": train},
        "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "method": {"name": "gompertz", **method},
        "losses": {"wasserstein_weight": 0.5, "grad_match_weight": 0.5},
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


class _Explodes(nn.Module):
    """A minimal trainable of the engine's contract (no distiller): its loss turns NaN at step 3."""

    metric_names = {"total": "train_total", "ce": "train_ce"}

    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def param_groups(self, base_lr):
        return [{"params": list(self.student.parameters()), "lr": base_lr}]

    def compile_networks(self):
        self.student.compile()

    def training_state(self):
        return self.state_dict()

    def load_training_state(self, state):
        self.load_state_dict(state)

    def forward(self, x, y, progress, step=0):
        logits = self.student(x)
        ce = nn.functional.cross_entropy(logits, y) * (math.nan if step >= 3 else 1.0)
        return {"total": ce, "ce": ce, "logits": logits}


def test_any_module_keeping_the_contract_trains():
    assert isinstance(_Explodes(), Trainable)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 32, 16)]
    result = fit(_Explodes(), batches, None, TrainConfig(epochs=1), FitOptions(progress_bar=False))
    assert set(result.history[0]) >= {"train_total", "train_ce", "train_accuracy", "lr"}


def test_nan_guard_stops_with_a_clear_error():
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in epoch 1 by step 4 .*ce=nan"):
        fit(_Explodes(), batches, None, TrainConfig(epochs=1), FitOptions(guard_every=4, progress_bar=False))


def test_callbacks_receive_every_metric(digits_small):
    seen = []
    params = tiny_params()
    train_teacher(params, digits_small, callbacks=[lambda n, v, s: seen.append((n, s))])
    names = {n for n, _ in seen}
    assert {"train_total", "train_ce", "train_accuracy", "val_accuracy", "lr", "weight"} <= names
    assert {s for _, s in seen} == {1, 2}
