"""lr_schedule plateau: a network trained until its validation accuracy stops improving (the teacher)."""

import pytest
import torch
from plain_trainable import PlainTrainable
from pydantic import ValidationError
from torch import nn

from gkd_core.checkpoints import Checkpointing
from gkd_core.config import TrainConfig, validate_params
from gkd_core.engine import FitOptions, Plateau, fit, lr_factor


def _cfg(**kw):
    base = {"epochs": 20, "lr": 0.1, "gamma": 0.5, "warmup_epochs": 1, "lr_schedule": "plateau",
            "plateau": {"patience": 2, "min_delta": 0.01, "reductions": 1}}
    return TrainConfig(**{**base, **kw})


def test_the_watcher_cuts_after_patience_and_stops_on_the_plateau_after_the_last_cut():
    w = Plateau(_cfg())
    seen = [w.observe(e, acc) for e, acc in enumerate([0.5, 0.6, 0.605, 0.60, 0.62, 0.625, 0.61], start=1)]
    # 1: warm-up (sets the best); 2: +0.10; 3: +0.005 < min_delta; 4: second miss -> lr x 0.5 (cut 1 of 1);
    # 5: +0.02 over 0.60 (the best: 0.605 never counted); 6, 7: two misses after the last cut -> stop at 7
    assert seen == ["improved", "improved", "waiting", "cut", "improved", "waiting", "stop"]
    assert w.factor == 0.5 and w.cuts == 1 and w.stopped_at == 7 and w.best == pytest.approx(0.62)
    copy = Plateau(_cfg())
    copy.load_state_dict(w.state_dict())
    assert copy.state_dict() == w.state_dict()


def test_no_cut_at_all_stops_on_the_first_plateau():
    w = Plateau(_cfg(warmup_epochs=0, plateau={"patience": 1, "min_delta": 0.0, "reductions": 0}))
    assert [w.observe(e, a) for e, a in [(1, 0.5), (2, 0.5)]] == ["improved", "stop"] and w.factor == 1.0


def test_lr_factor_holds_after_the_warm_up_at_the_watchers_factor():
    cfg, w = _cfg(), Plateau(_cfg())
    assert lr_factor(0, 200, cfg, 10) == pytest.approx(0.1) and lr_factor(150, 200, cfg, 10) == 1.0
    w.factor = 0.25
    assert lr_factor(3, 200, cfg, 10, w) == pytest.approx(0.4) and lr_factor(150, 200, cfg, 10, w) == 0.25


class _Frozen(PlainTrainable):
    """A trainable whose loss has zero gradient: the weights never move, so validation accuracy is constant and
    the plateau's timing is exact: improved at epoch 1, cut at 3, stop at 5 (patience 2, one cut)."""

    metric_names = {"total": "train_total"}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x, y, progress, step=0):
        logits = self.student(x)
        return {"total": logits.sum() * 0.0, "logits": logits}


def _batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_fit_stops_on_the_plateau_with_the_cut_learning_rate_in_its_history(tmp_path, caplog):
    cfg = _cfg(warmup_epochs=0, weight_decay=0.0, momentum=0.0)
    options = FitOptions(progress_bar=False, desc="frozen")
    with caplog.at_level("INFO", logger="gkd_core.engine"):
        result = fit(_Frozen(), _batches(), _batches(2), cfg, options)
    assert result.stopped_at_epoch == 5 and len(result.history) == 5  # of at most 20
    assert [r["lr"] for r in result.history] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05])
    # each cut or stop is logged after the line of the epoch whose validation accuracy caused it
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("frozen")]
    kinds = ["cut" if "lr x" in m else "stop" if "plateaued" in m else m.split()[2] for m in lines]
    assert kinds == ["1/20", "2/20", "3/20", "cut", "4/20", "5/20", "stop"]
    assert "lr x 0.5 (cut 1 of 1)" in lines[3] and "stopped after epoch 5 of at most 20" in lines[6]

    # a run interrupted after the cut resumes with the watcher's state: the same stop, the same learning rates
    ckpt = Checkpointing(tmp_path / "p.ckpt", "fp")
    fit(_Frozen(), _batches(), _batches(2), cfg, FitOptions(progress_bar=False, checkpoint=ckpt, stop_after_epochs=3))
    resumed = fit(_Frozen(), _batches(), _batches(2), cfg, FitOptions(progress_bar=False, checkpoint=ckpt))
    assert resumed.resumed_from_epoch == 3 and resumed.stopped_at_epoch == 5
    assert [r["lr"] for r in resumed.history] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05])
    # resuming a run that had stopped trains nothing more
    again = fit(_Frozen(), _batches(), _batches(2), cfg, FitOptions(progress_bar=False, checkpoint=ckpt))
    assert again.epochs_run == 0 and again.stopped_at_epoch == 5 and len(again.history) == 5


def test_plateau_needs_a_validation_split():
    with pytest.raises(ValueError, match="lr_schedule 'plateau' watches validation accuracy"):
        fit(_Frozen(), _batches(), None, _cfg(), FitOptions(progress_bar=False, desc="teacher"))


def _params(section):
    train = {"epochs": 3, "lr_schedule": "plateau"}
    return {"teacher": {"model": {"name": "digits_cnn"}, "train": train if section == "teacher" else {"epochs": 3}},
            "student": {"model": {"name": "digits_cnn", "width": 0.5},
                        "train": train if section == "student" else {"epochs": 3}},
            "method": {"name": "kd"}}


def test_only_the_teacher_may_train_to_a_plateau():
    assert validate_params(_params("teacher")).teacher.train.lr_schedule == "plateau"
    with pytest.raises((ValidationError, ValueError), match=r"student.train.lr_schedule = 'plateau' is for a network "
                                                            r"trained alone .* allowed: cosine, multistep, constant"):
        validate_params(_params("student"))


def test_a_teacher_on_digits_reports_where_its_plateau_ended_training(tmp_path):
    from gkd_core.data import prepare_dataset
    from gkd_core.runner import train_teacher

    raw = _params("teacher")
    raw["teacher"]["train"] = {"epochs": 30, "batch_size": 64, "lr_schedule": "plateau",
                               "plateau": {"patience": 1, "min_delta": 0.0, "reductions": 0}}
    params = validate_params({**raw, "dataset": {"name": "digits", "limit": 300},
                              "runtime": {"device": "cpu", "progress_bar": False}})
    data = prepare_dataset(params.dataset, seed=0)
    result = train_teacher(params, data)
    s = result.summary
    assert s["epochs"] == 30 and s["epochs_trained"] == len(result.history) == s["stopped_at_epoch"] < 30
    vals = [r["val_accuracy"] for r in result.history]
    assert vals[-1] <= max(vals[:-1])  # patience 1, no cut: it stopped on the first epoch that did not improve
