"""Hyper-parameter search on the validation split (Optuna): one study per preset and method.

Each method declares its search space here, next to the objective: the student's learning rate and weight
decay for every method, plus the method's own knobs (ranges from the papers or docs/method.md, inside what
params validation accepts). A trial distils one student with the preset's data and teacher (the sweep's
folder, ``reports/sweep/<preset>/``, prepared once) and returns its best validation accuracy; the engine's
per-epoch validation accuracy goes to Optuna's median pruner, which stops a hopeless trial from half of its
epochs on (:func:`trial_pruner`; no checkpoint is written, nothing is registered). The test split is never
evaluated by a trial.

Studies live in Optuna's RDB storage (``--storage``, default ``sqlite:///<project>/optuna.db``; the
PostgreSQL of compose.yaml works the same): an interrupted search resumes where it stopped, and several
processes or machines add trials to one study without running the same trial twice. Every method gets the
same number of trials and the same epochs (equal budgets).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import optuna
import yaml

from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.guard import NonFiniteLossError
from gkd_core.io import atomic_write
from gkd_core.methods import method_spec
from gkd_core import runner
from tasks import tracking
from tasks.inputs import load_model_checked, load_prepared_checked
from tasks.distill_student import teacher_cache_meta
from tasks.paths import PARAMS_FILE, PREPARED, TEACHER, TEACHER_CACHE, StagePaths

logger = logging.getLogger(__name__)

TUNE_DIR = "reports/tune"
TUNED_FILE = "tuned.yaml"  # reports/tune/<preset>/tuned.yaml: the best overrides per method
STORAGE_FILE = "optuna.db"
OBJECTIVE = "best_val_accuracy"
# trials that used their share of a study's budget (a running one has not yet)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

Space = Callable[[optuna.Trial], dict[str, Any]]


def _shared(trial: optuna.Trial) -> dict[str, Any]:
    """Every method, the student alone too: the optimiser's step size and weight decay."""
    return {"student.train.lr": trial.suggest_float("student.train.lr", 1e-3, 0.3, log=True),
            "student.train.weight_decay": trial.suggest_float("student.train.weight_decay", 1e-6, 1e-2, log=True)}


def _kd(trial: optuna.Trial) -> dict[str, Any]:  # Hinton: weight and temperature (T in 1..8 in the paper's use)
    return {"method.kd.a": trial.suggest_float("method.kd.a", 0.25, 4.0, log=True),
            "losses.temperature": trial.suggest_float("losses.temperature", 1.0, 8.0)}


def _gompertz_curve(trial: optuna.Trial, section: str) -> dict[str, Any]:
    """The curve by what it means (docs/method.md): the final weight a, the starting weight w0 as a fraction of
    a, and the inflection p* in training progress; b = ln(a / w0), c = ln(b) / p*."""
    a = trial.suggest_float(f"method.{section}.a", 0.25, 4.0, log=True)
    w0_frac = trial.suggest_float(f"method.{section}.w0_fraction", 1e-3, 0.2, log=True)
    p_star = trial.suggest_float(f"method.{section}.inflection", 0.1, 0.7)
    b = math.log(1.0 / w0_frac)
    return {f"method.{section}.a": a, f"method.{section}.b": b, f"method.{section}.c": math.log(b) / p_star}


def _term_weights(trial: optuna.Trial, section: str) -> dict[str, Any]:
    return {f"method.{section}.weights": {
        "kd": 1.0,
        "wasserstein": trial.suggest_float(f"method.{section}.weights.wasserstein", 0.1, 3.0, log=True),
        "grad_match": trial.suggest_float(f"method.{section}.weights.grad_match", 0.1, 3.0, log=True)}}


SEARCH_SPACES: dict[str, Space] = {
    "none": lambda t: {},
    "kd": _kd,
    "gompertz": lambda t: {**_gompertz_curve(t, "gompertz"), **_term_weights(t, "gompertz"),
                           "losses.temperature": t.suggest_float("losses.temperature", 1.0, 8.0)},
    "gompertz_kd": lambda t: {**_gompertz_curve(t, "gompertz_kd"),
                              "losses.temperature": t.suggest_float("losses.temperature", 1.0, 8.0)},
    "dynamic_kd": lambda t: {"method.dynamic_kd.controller_lr_scale":
                             t.suggest_float("method.dynamic_kd.controller_lr_scale", 0.1, 10.0, log=True)},
    "akd": lambda t: {"method.akd.beta": t.suggest_float("method.akd.beta", 0.1, 10.0, log=True)},
    "ces_kd": lambda t: {"method.ces_kd.pace": t.suggest_float("method.ces_kd.pace", 0.2, 0.9)},
}


def search_space(method: str) -> Space:
    if method not in SEARCH_SPACES:
        raise UserError(f"method {method!r} has no search space; tunable: {', '.join(SEARCH_SPACES)}")
    return SEARCH_SPACES[method]


def trial_overrides(method: str, trial: optuna.Trial) -> dict[str, Any]:
    """The params overrides of one trial: ``method.name``, the shared space and the method's own."""
    return {"method.name": method, **_shared(trial), **search_space(method)(trial)}


STORAGE_ENV = "GKD_OPTUNA_STORAGE"  # the storage every machine of a search shares (compose.yaml: its PostgreSQL)


def storage_url(root: Path, given: Optional[str]) -> str:
    """``given``, else ``$GKD_OPTUNA_STORAGE``, else ``sqlite:///<root>/optuna.db``."""
    return given or os.environ.get(STORAGE_ENV, "").strip() or f"sqlite:///{(root / STORAGE_FILE).resolve()}"


def open_study(name: str, storage: str, seed: int = 0, pruner: Optional[optuna.pruners.BasePruner] = None
               ) -> optuna.Study:
    """The study ``name`` (created when missing) with a seeded TPE sampler and ``pruner`` (none by default: a
    study opened to read it prunes nothing; trials get :func:`trial_pruner`). Stale trials of a killed worker
    are failed after two missed heartbeats."""
    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=120)
    return optuna.create_study(study_name=name, storage=rdb, direction="maximize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=seed),
                               pruner=pruner or optuna.pruners.NopPruner())


def trial_pruner(train: Any) -> optuna.pruners.MedianPruner:
    """The trials' median pruner for a student recipe ``train`` (its TrainConfig): after 3 finished trials, a
    trial whose validation accuracy after an epoch is below the median of the others' at that epoch stops, but
    only from half of the budget on (and never inside the lr warm-up): a slow-start schedule keeps its weight
    near zero early by design, and an early epoch would judge every method on the learning rate alone."""
    return optuna.pruners.MedianPruner(n_startup_trials=3,
                                       n_warmup_steps=max(train.warmup_epochs + 1, math.ceil(train.epochs / 2)))


def sampler_seed(study_name: str, trials_so_far: int, worker: int = 0) -> int:
    """The sampler's seed for a worker joining a study: different for every worker of a search (its index and
    machine) and for every resumption (the trials already in the study), so no two workers, and no resumed
    search, draw the same random settings again (TPE's first trials are random draws from the seed); the same
    for the same state, so a one-worker search repeats."""
    blob = f"{study_name}/{socket.gethostname()}/{worker}/{trials_so_far}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big")


def join_study(name: str, storage: str, worker: int = 0,
               pruner: Optional[optuna.pruners.BasePruner] = None) -> optuna.Study:
    """:func:`open_study` for worker number ``worker`` of a search, its sampler seeded by :func:`sampler_seed`
    from the trials the study already holds."""
    study = open_study(name, storage, pruner=pruner)
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed(name, len(study.trials), worker))
    return study


def finished(study: optuna.Study) -> int:
    """Trials that used their budget: complete, pruned or failed (a running one is not counted)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@dataclass
class TrialContext:
    """What every trial of one study shares: the sweep folder with the data and teacher, the MLflow parent."""

    method: str
    folder: Path
    parent_run_id: Optional[str] = None
    pruner: Optional[optuna.pruners.BasePruner] = None  # default: trial_pruner(the student's recipe)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # the preset's own overrides of this arm (arm_params)


def run_trials(ctx: TrialContext, study_name: str, storage: str, n_trials: int, budget: int, worker: int = 0) -> int:
    """Run up to ``n_trials`` trials of ``study_name`` in this process (worker number ``worker`` of the search),
    stopping once the study has ``budget`` finished trials (see :func:`finished`); returns how many it ran."""
    base = load_params_checked(ctx.folder / PARAMS_FILE, {**ctx.fixed, "method.name": ctx.method}, check_dataset=False)
    study = join_study(study_name, storage, worker, pruner=ctx.pruner or trial_pruner(base.student.train))
    if finished(study) >= budget:
        return 0
    paths = StagePaths(ctx.folder)
    data = load_prepared_checked(paths.input(PREPARED))
    teacher = None
    if method_spec(ctx.method).needs_teacher:
        teacher, _ = load_model_checked(paths.input(TEACHER), "teacher", "train_teacher", data,
                                        base.teacher.model, "teacher.model")
    client = tracking.get_client(ctx.folder) if ctx.parent_run_id else None
    cache_file = ctx.folder / TEACHER_CACHE  # computed once by the search's shared stages (tasks.sweep)
    shared_cache = (cache_file, teacher_cache_meta(paths.input(TEACHER), data)) \
        if teacher is not None and cache_file.is_file() else None

    ran = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal ran
        ran += 1
        overrides = trial_overrides(ctx.method, trial)
        params = load_params_checked(ctx.folder / PARAMS_FILE, {**ctx.fixed, **overrides}, check_dataset=False)
        run = tracking.StageRun(None, None)
        if client is not None:
            experiment = client.get_run(ctx.parent_run_id).info.experiment_id
            run = tracking.StageRun(client, tracking.create_run(client, experiment, f"trial-{trial.number}", {
                "gkd.stage": "tune-trial", "method": ctx.method, "optuna.study": study_name,
                "optuna.trial": str(trial.number)}, ctx.parent_run_id), ctx.folder)
            run.log_params({k: v for k, v in overrides.items()})

        def report(name: str, value: float, epoch: int) -> None:
            run.callback(name, value, epoch)
            if name == "val_accuracy":
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {epoch}: val accuracy {value:.4f} below the median")

        state = "failed"
        try:
            result = runner.distill_student(params, data, teacher, checkpoint_path=None, callbacks=[report],
                                            teacher_cache=shared_cache)
            value = float(result.summary[OBJECTIVE])
            state = "complete"
            return value
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            run.flush()
            if run.enabled:
                run.set_tags({"optuna.state": state})
                client.set_terminated(run.run_id, "FINISHED" if state != "failed" else "FAILED")

    study.optimize(objective, n_trials=n_trials, catch=(NonFiniteLossError,),  # a diverged trial: FAIL, go on
                   callbacks=[optuna.study.MaxTrialsCallback(budget, states=FINISHED)])
    return ran


def best_overrides(study: optuna.Study, method: str) -> Optional[dict[str, Any]]:
    """The params overrides of the study's best trial (rebuilt from its sampled values)."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    fixed = optuna.trial.FixedTrial(best.params)
    return trial_overrides(method, fixed)


def write_tuned(folder: Path, entries: Mapping[str, Mapping[str, Any]]) -> Path:
    """``<folder>/tuned.yaml``: per method its best overrides, value and trial (merged with what is there)."""
    path = folder / TUNED_FILE
    current = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    current.setdefault("methods", {}).update({m: dict(e) for m, e in entries.items()})
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fh.write("# best validation-accuracy settings per method (flows.tune); flows.sweep --tuned reads them\n")
        fh.write(yaml.safe_dump(current, sort_keys=False))
    return path


def read_tuned(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / TUNED_FILE
    if not path.is_file():
        raise UserError(f"{path}: no tuned settings (run `python -m flows.tune --preset ...` first)")
    return (yaml.safe_load(path.read_text()) or {}).get("methods") or {}
