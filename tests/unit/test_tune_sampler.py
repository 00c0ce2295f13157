"""tasks.tune's sampler seeds: two workers of one search, or a search resumed, never draw the same settings
(the first 8 CIFAR-10 trials of a 2-worker search came in identical pairs when every worker used seed 0)."""

from __future__ import annotations

from pathlib import Path

from tasks.tune import join_study, sampler_seed


def _first_draws(storage: str, name: str, worker: int, n: int) -> list[float]:
    study = join_study(name, storage, worker)
    drawn: list[float] = []

    def objective(trial) -> float:  # noqa: ANN001
        drawn.append(trial.suggest_float("x", 0.0, 1.0))
        return drawn[-1]

    study.optimize(objective, n_trials=n)
    return drawn


def test_workers_and_resumptions_draw_different_settings(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert sampler_seed("s", 0, 0) == sampler_seed("s", 0, 0)  # one worker, same state: the same draws
    assert len({sampler_seed("s", 0, 0), sampler_seed("s", 0, 1), sampler_seed("s", 3, 0), sampler_seed("t", 0, 0)}) == 4
    worker0 = _first_draws(storage, "s", 0, 3)
    worker1 = _first_draws(f"sqlite:///{tmp_path / 'other.db'}", "s", 1, 3)  # a second worker, same study state
    assert not set(worker0) & set(worker1)
    resumed = _first_draws(storage, "s", 0, 3)  # the same worker again, after 3 trials
    assert not set(resumed) & set(worker0)
    # and a one-worker search is repeatable: a fresh study draws what the first one drew
    assert _first_draws(f"sqlite:///{tmp_path / 'again.db'}", "s", 0, 3) == worker0
