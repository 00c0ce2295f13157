"""Every Prefect task the flows run, and the one table of their retry policies.

tasks/ has no Prefect in it: its stage functions are plain Python. Here they become Prefect tasks, each with
the retries and delay of :data:`RETRIES` (tests/integration/test_pipeline.py checks the tasks against it).
"""

from __future__ import annotations

import functools
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.guard import NonFiniteLossError
from tasks import dvc_ops
from tasks.dvc_ops import StageFailed
from tasks.cli import configure_logging
from tasks.paths import PARAMS_FILE
from tasks.promote import PromotionError, promote
from tasks.register import register
from tasks.sweep import sweep_point


@dataclass(frozen=True)
class Retry:
    retries: int
    delay_seconds: float


# Retries where a failure can be transient: reading the dataset (network storage), long training (GPU
# preemption, OOM from a neighbour; the stage resumes from its per-epoch checkpoint), the MLflow registry and
# tracking server. Evaluation and export are deterministic: a failure there is a bug, retrying would only hide it.
# Whatever the count, a failure a rerun repeats (bad input, a diverged run) is never retried: see
# retry_unless_deterministic.
RETRIES: dict[str, Retry] = {
    "prepare_data": Retry(2, 10),
    "train_teacher": Retry(2, 30),
    "distill_student": Retry(2, 30),
    "evaluate": Retry(0, 0),
    "export_onnx": Retry(0, 0),
    "register": Retry(2, 10),
    "promote": Retry(2, 10),
    "sweep-point": Retry(1, 10),
    "tune-trials": Retry(1, 10),  # a worker process of a search died: the retry adds only the missing trials
}
GPU_STAGES = frozenset({"train_teacher", "distill_student"})


def retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failure that may be transient (a crash, a server not yet up,
    a network remote), never one that a rerun repeats: bad input (:class:`UserError`), a stage that refused its
    input or diverged (:class:`StageFailed` with ``retryable=False``), a run that went non-finite."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, StageFailed):
        return exc.retryable
    if isinstance(exc, PromotionError):  # a timeout may pass, a deleted run or a 403 will not
        return exc.retryable
    return not isinstance(exc, (UserError, NonFiniteLossError))


def _policy(name: str) -> dict[str, Any]:
    return {"name": name, "retries": RETRIES[name].retries, "retry_delay_seconds": RETRIES[name].delay_seconds,
            "retry_condition_fn": retry_unless_deterministic, "cache_policy": NO_CACHE}


@task(name="dvc-stage", cache_policy=NO_CACHE)
def stage_task(root: str, stage: str, parent_run_id: Optional[str]) -> dict[str, Any]:
    """Reproduce one DVC stage (with nested MLflow run when ``parent_run_id`` is given)."""
    params = load_params_checked(Path(root) / PARAMS_FILE, check_dataset=False)
    return dvc_ops.run_stage(root, stage, parent_run_id=parent_run_id, params=params)


def stage_options(stage: str) -> dict[str, Any]:
    """``stage_task.with_options(**stage_options(stage))``: the stage's name, retries and gpu/cpu tag."""
    return {**_policy(stage), "tags": ["gpu"] if stage in GPU_STAGES else ["cpu"]}


PROMOTION_LIMIT = "gkd-promotion"  # Prefect global concurrency limit: one promotion at a time, everywhere
PROMOTION_WAIT_S = 1800.0  # how long a promotion waits for the slot before it fails (and is retried)


def ensure_promotion_limit() -> None:
    """Create the global concurrency limit :data:`PROMOTION_LIMIT` (1 slot) on the Prefect server if missing."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(PROMOTION_LIMIT, 1)
        except Exception:  # noqa: BLE001  created by another process in between: it must be readable now
            client.read_global_concurrency_limit_by_name(PROMOTION_LIMIT)


@functools.wraps(promote)
def promote_serialised(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`tasks.promote.promote` holding the one slot of :data:`PROMOTION_LIMIT`: reading the aliases,
    deciding and moving ``champion`` happen for one promotion at a time across every process and machine that
    uses this Prefect server (the nightly pipeline's, ``gkd-promote/daily``, a person's), so any interleaving
    ends with the registry of some one-after-the-other order."""
    ensure_promotion_limit()
    get_run_logger().info("waiting for the promotion slot (global concurrency limit %s)", PROMOTION_LIMIT)
    with concurrency(PROMOTION_LIMIT, occupy=1, strict=True, timeout_seconds=PROMOTION_WAIT_S):
        return promote(*args, **kwargs)


def run_on_gpu_pool(deployment: str, parameters: dict[str, Any], timeout_s: float, stage: str) -> Any:
    """``run_deployment`` of ``deployment`` and wait at most ``timeout_s`` (params.yaml ``timeouts.gpu_stage``).
    A run still unfinished then (no worker took it, or its worker hangs) is cancelled (a worker kills its
    process) and :class:`StageFailed` ends the caller with that cause; it is not retried (the same wait would
    hang again). Returns the finished flow run."""
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling

    run = run_deployment(deployment, parameters=parameters, timeout=timeout_s)
    if run.state is not None and run.state.is_final():
        return run
    state = run.state.name if run.state else "without a state"
    started = run.state is not None and run.state.type in (StateType.RUNNING, StateType.CANCELLING)
    message = f"{stage} on the gpu pool did not finish within timeouts.gpu_stage={timeout_s:g} s ({state})"
    with get_client(sync_client=True) as client:
        # a run a worker started is stopped by that worker (Cancelling); one nobody took is simply Cancelled
        client.set_flow_run_state(run.id, (Cancelling if started else Cancelled)(message=message), force=True)
    raise StageFailed(stage, f"{message}: its flow run {run.id} ({deployment}) was cancelled", "gpu_run", None,
                      retryable=False)


register_task = task(register, **_policy("register"))
promote_task = task(promote_serialised, **_policy("promote"))


_worker_logging = False


def _log_like_the_command_line() -> None:
    """The command line's log format in a ProcessPoolTaskRunner worker: a fresh process whose root logger
    Prefect set to WARNING, so a point's or a trial's epoch lines would go nowhere (once per process)."""
    global _worker_logging
    if not _worker_logging and multiprocessing.parent_process() is not None:
        configure_logging()
        _worker_logging = True


@functools.wraps(sweep_point)
def _sweep_point_logged(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`sweep_point`, logged as on the command line."""
    _log_like_the_command_line()
    return sweep_point(*args, **kwargs)


sweep_point_task = task(_sweep_point_logged, **_policy("sweep-point"))


def _tune_trials(method: str, folder: str, parent_run_id: Optional[str], study_name: str, storage: str,
                 n_trials: int, budget: int, worker: int = 0, fixed: Optional[dict[str, Any]] = None) -> int:
    """Up to ``n_trials`` trials of one study in this worker process, never past the study's ``budget`` (so a
    retried task adds only what is missing): tasks.tune.run_trials, logged as on the command line."""
    from tasks import tune  # optuna: imported by the search only

    _log_like_the_command_line()
    return tune.run_trials(tune.TrialContext(method, Path(folder), parent_run_id, fixed=dict(fixed or {})), study_name,
                           storage, n_trials, budget, worker)


tune_trials_task = task(_tune_trials, **_policy("tune-trials"))
