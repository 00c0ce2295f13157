"""flows.tune on digits: a tiny study with a real sqlite storage. The test split is never touched by a trial;
the study resumes without repeating finished trials; two workers add trials to one study; the results (tuned
settings, summary, PNGs, MLflow runs) are written; `flows.sweep --tuned` evaluates the tuned arm on test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _project import REPO, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["-S", "teacher.train.epochs=2", "-S", "student.train.epochs=2"]


class _Forbidden(torch.Tensor):
    """A tensor that fails any use: the test split as a trial must see it (never)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        raise AssertionError(f"a trial used the test split ({getattr(func, '__name__', func)})")


def test_trials_never_touch_the_test_split_and_leave_nothing_behind(clone_project, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from tasks import tune as tuning
    from tasks.inputs import load_prepared_checked

    root: Path = clone_project()  # a project after its pipeline run: params, data and teacher in place

    def poisoned(path):  # noqa: ANN001, ANN202
        data = load_prepared_checked(path)
        object.__setattr__(data, "test_x", data.test_x.as_subclass(_Forbidden))
        object.__setattr__(data, "test_y", data.test_y.as_subclass(_Forbidden))
        return data

    monkeypatch.setattr(tuning, "load_prepared_checked", poisoned)
    before = sorted(p for p in root.rglob("*") if ".git" not in p.parts)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    ctx = tuning.TrialContext("kd", root)
    assert tuning.run_trials(ctx, "t-kd", storage, n_trials=3, budget=3) == 3
    assert tuning.run_trials(ctx, "t-kd", storage, n_trials=3, budget=3) == 0  # the budget is spent
    study = optuna.load_study(study_name="t-kd", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(0.0 < t.value <= 1.0 for t in study.trials)
    overrides = tuning.best_overrides(study, "kd")
    assert overrides["method.name"] == "kd" and {"student.train.lr", "method.kd.a", "losses.temperature"} <= set(overrides)
    assert sorted(p for p in root.rglob("*") if ".git" not in p.parts) == before  # no checkpoint, no file


def test_a_pruned_trial_stops_cleanly(clone_project, tmp_path: Path) -> None:
    import optuna

    from tasks import tune as tuning

    root: Path = clone_project()
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    ctx = tuning.TrialContext("none", root, pruner=optuna.pruners.ThresholdPruner(lower=1.01))  # always below
    before = sorted(p for p in root.rglob("*") if ".git" not in p.parts)
    tuning.run_trials(ctx, "p", storage, n_trials=1, budget=1)
    trial = optuna.load_study(study_name="p", storage=storage).trials[0]
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]  # stopped after epoch 1
    assert sorted(p for p in root.rglob("*") if ".git" not in p.parts) == before


def test_the_tune_command_resumes_shares_and_feeds_the_sweep(clone_project, tmp_path: Path) -> None:
    import optuna

    root: Path = clone_project()
    (root / "sweeps.yaml").write_text((REPO / "sweeps.yaml").read_text())
    cmd = [sys.executable, "-m", "flows.tune", "--preset", "digits-smoke", "--methods", "kd", "--workers", "2", *TINY]
    listed = run([sys.executable, "-m", "flows.tune", "--preset", "digits-smoke", "--methods", "kd", "none",
                  "--trials", "0"], root, check=False)  # README's `--methods a b c` form parses (then 0 is refused)
    assert listed.returncode == 2 and "--trials" in listed.stderr and "Got unexpected extra" not in listed.stderr
    first = run([*cmd, "--trials", "3"], root, timeout=900)
    storage = f"sqlite:///{root / 'optuna.db'}"
    study = optuna.load_study(study_name="tune-digits-smoke-kd", storage=storage)
    first_params = {t.number: t.params for t in study.trials}
    assert len(first_params) == 3, first.stderr[-3000:]
    second = run([*cmd, "--trials", "5"], root, timeout=900)  # an interrupted or extended search: 2 more only
    study = optuna.load_study(study_name="tune-digits-smoke-kd", storage=storage)
    assert len(study.trials) == 5 and {t.number: t.params for t in study.trials[:3]} == first_params
    assert "3 of 5 trials done, 2 to run on 2 worker(s)" in second.stderr, second.stderr[-3000:]
    out = root / "reports/tune/digits-smoke"
    assert (out / "kd-history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `kd` |" in (out / "summary.md").read_text()
    tuned = (out / "tuned.yaml").read_text()
    assert "method.name: kd" in tuned and "student.train.lr" in tuned
    # the teacher the settings were tuned against (the preset's, with -S teacher.train.epochs=2), for --tuned
    assert yaml.safe_load(tuned)["methods"]["kd"]["teacher"]["teacher"]["train"]["epochs"] == 2
    # the MLflow side: one parent run per study, a child run per trial with its state
    from tasks import tracking

    client = tracking.get_client(root)
    trials = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`gkd.stage` = 'tune-trial'")
    assert len(trials) == 5 and {r.data.tags["optuna.state"] for r in trials} <= {"complete", "pruned"}
    assert all("val_accuracy" in r.data.metrics for r in trials)
    # settings tuned against the 2-epoch teacher are refused for the preset's own (3 epochs), before any compute
    other = run([sys.executable, "-m", "flows.sweep", "--preset", "digits-smoke", "--methods", "kd", "--tuned"],
                root, check=False)
    assert other.returncode != 0 and "teacher.train.epochs: 2 -> 3" in other.stderr, other.stderr[-2000:]
    assert not (root / "reports/sweep/digits-smoke/comparison.json").exists()
    # the tuned arm beside the default one, on the test split over the preset's seeds
    sweep = run([sys.executable, "-m", "flows.sweep", "--preset", "digits-smoke", "--methods", "kd", "--seeds", "0",
                 "--tuned", "--workers", "1", *TINY], root, timeout=900)
    table = json.loads((root / "reports/sweep/digits-smoke/comparison.json").read_text())
    assert [r["arm"] for r in table["arms"]] == ["kd", "kd-tuned"], sweep.stderr[-2000:]
    assert all(r["test_accuracy"]["mean"] > 0.2 for r in table["arms"])
