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


def test_the_pruner_judges_a_trial_from_half_of_its_epochs_on() -> None:
    """A slow-start schedule is not pruned for its early epochs: 8 epochs with 1 of warm-up -> judged from epoch
    4 on; a 3-epoch recipe without warm-up -> from epoch 2."""
    import optuna

    from gkd_core.config import TrainConfig
    from tasks.tune import trial_pruner

    assert trial_pruner(TrainConfig(epochs=8, warmup_epochs=1))._n_warmup_steps == 4
    assert trial_pruner(TrainConfig(epochs=3, warmup_epochs=0))._n_warmup_steps == 2
    assert trial_pruner(TrainConfig(epochs=4, warmup_epochs=3))._n_warmup_steps == 4  # never inside the warm-up
    study = optuna.create_study(direction="maximize", pruner=trial_pruner(TrainConfig(epochs=8, warmup_epochs=1)))
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for _ in range(3):  # the median pruner's start-up trials: 0.9 at every epoch
        study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=0.9,
                                                  intermediate_values={e: 0.9 for e in range(1, 9)}))
    trial = study.ask()
    verdicts = []
    for epoch in range(1, 6):  # far below the median at every epoch
        trial.report(0.1, epoch)
        verdicts.append(trial.should_prune())
    assert verdicts == [False, False, False, True, True]
