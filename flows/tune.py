"""Hyper-parameter search as a Prefect flow: an Optuna study per preset and method, on validation accuracy.

    python -m flows.tune --preset digits-smoke --methods kd gompertz --trials 20 --workers 2
    python -m flows.tune --preset fashion-mnist --storage postgresql://gkd:...@db/optuna   # shared by machines
    python -m flows.sweep --preset fashion-mnist --tuned        # then the tuned settings on the test split

The preset's data and teacher are prepared once in ``reports/sweep/<preset>/`` (the sweep's folder, so the
tuned arms are evaluated against the same teacher). For each method a study ``tune-<preset>-<method>`` gets
``--trials`` trials in total (complete, pruned or failed; an interrupted search adds only the missing ones),
run by ``--workers`` Prefect tasks in processes of their own, each adding trials to the one study through
Optuna's RDB storage. One MLflow parent run per study, a child run per trial (its sampled params, its
validation curve, its state). At the end: ``reports/tune/<preset>/`` holds tuned.yaml (the best overrides per
method), summary.md, and per method the optimisation history and parameter importances as PNGs.
The search space and objective: tasks/tune.py.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ProcessPoolTaskRunner

from flows import cli as flow_cli
from flows.prefect_tasks import run_on_gpu_pool, stage_options, tune_trials_task
from gkd_core.cli_support import UserError, load_params_checked, parse_overrides, run_cli
from gkd_core.io import atomic_write
from tasks import flow_inputs, handoff, project_lock, tracking
from tasks import tune as tuning
from tasks.cli import configure_logging
from flows.sweep import exchange_url, expand_multi_values
from tasks.dvc_ops import StageFailed
from tasks.paths import PARAMS_FILE
from tasks.sweep import (SHARED_FILES, SWEEP_DIR, SweepSpec, load_preset, shared_stages, sweep_root, teacher_recipe,
                         write_sweep_params)

logger = logging.getLogger(__name__)


def plan(remaining: int, workers: int) -> list[int]:
    """``remaining`` trials split over at most ``workers`` processes (as even as can be)."""
    workers = max(1, min(workers, remaining))
    return [remaining // workers + (1 if i < remaining % workers else 0) for i in range(workers)] if remaining else []


def plots(study: Any, out: Path, method: str) -> list[Path]:
    """The optimisation history and (with two or more complete trials) the parameter importances as PNGs,
    through optuna's matplotlib backend; every figure is closed (no pyplot state survives)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    for name, draw, enough in (("history", ovm.plot_optimization_history, bool(complete)),
                               ("importances", ovm.plot_param_importances,
                                len(complete) >= 2 and len(complete[0].params) >= 2)):
        if not enough:
            continue
        ax = draw(study)
        fig = ax.figure
        try:
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            path = out / f"{method}-{name}.png"
            with atomic_write(path, "wb") as fh:
                fig.savefig(fh, format="png", dpi=110)
            written.append(path)
        finally:
            plt.close(fig)
    return written


def summary_markdown(preset: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"# Tuning {preset}: best validation accuracy per method", "",
             "Each method had the same trial budget and epochs; the test split was not read.", "",
             "| method | trials (complete / pruned / failed) | best val accuracy | best trial | best settings |",
             "|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`"
                             for k, v in (r["params"] or {}).items())
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        lines.append(f"| `{r['method']}` | {r['complete']} / {r['pruned']} / {r['failed']} | {value} | "
                     f"{r['trial'] if r['trial'] is not None else '-'} | {settings or '-'} |")
    return "\n".join(lines) + "\n"


TUNE_TRIALS_DEPLOYMENT = "gkd-tune-trials/gpu"


@flow(name="gkd-tune-trials")
def tune_trials_flow(preset: str, method: str, n_trials: int, budget: int, worker: int = 0,
                     fixed: Optional[dict[str, Any]] = None, parent_run_id: Optional[str] = None,
                     git_commit: Optional[str] = None, project_dir: Optional[str] = None) -> int:
    """Trials of the study ``tune-<preset>-<method>`` on a GPU worker, in a checkout of its own at ``git_commit``:
    the preset's data and teacher fetched from this worker's DVC remote (``<remote>/gkd-sweeps/<preset>``, as a
    sweep point's), the trials added to the storage this worker is configured with (``$GKD_OPTUNA_STORAGE``,
    never a URL from the caller). Returns how many trials it ran."""
    flow_inputs.name(preset, "preset")
    flow_inputs.name(method, "method")
    tuning.search_space(method)
    flow_inputs.run_id(parent_run_id)
    flow_inputs.commit(git_commit)
    if not (1 <= int(n_trials) <= 10_000 and 1 <= int(budget) <= 10_000 and 0 <= int(worker) <= 256):
        raise UserError(f"n_trials={n_trials}, budget={budget}, worker={worker}: expected 1..10000, 1..10000, 0..256")
    storage = os.environ.get(tuning.STORAGE_ENV, "").strip()
    if not storage:
        raise UserError(f"trials on the gpu pool add to a study every machine reaches: set {tuning.STORAGE_ENV} "
                        "(e.g. postgresql://...) for this worker, the same as the search's --storage")
    base = flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None)

    def trials_in(root: Path) -> int:
        folder = root / SWEEP_DIR / preset
        handoff.Exchange(exchange_url(root, preset)).get(folder, list(SHARED_FILES))
        ctx = tuning.TrialContext(method, folder, parent_run_id, fixed=dict(fixed or {}))
        return tuning.run_trials(ctx, f"tune-{preset}-{method}", storage, int(n_trials), int(budget), int(worker))

    if git_commit is None:
        return trials_in(base)
    with handoff.run_checkout(base, git_commit, f"tune-{method}-{worker}-{flow_run.id or 'local'}") as root:
        get_run_logger().info("run checkout %s at commit %s (from %s)", root, git_commit[:12], base)
        return trials_in(root)


@task(name="tune-trials-on-gpu", **{k: v for k, v in stage_options("distill_student").items()
                                    if k not in ("name", "tags")})
def dispatch_trials(preset: str, method: str, n_trials: int, budget: int, worker: int, fixed: dict[str, Any],
                    parent_run_id: Optional[str], git_commit: str, folder: str) -> None:
    """One worker's share of a study on the gpu pool, waited for (``timeouts.gpu_stage`` per share)."""
    limit = load_params_checked(Path(folder) / PARAMS_FILE, check_dataset=False).timeouts.gpu_stage
    label = f"tune {method} share {worker}"
    run = run_on_gpu_pool(TUNE_TRIALS_DEPLOYMENT, {
        "preset": preset, "method": method, "n_trials": n_trials, "budget": budget, "worker": worker,
        "fixed": fixed, "parent_run_id": parent_run_id, "git_commit": git_commit}, limit, label)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "without a state"
        raise StageFailed(label, f"{label} on the gpu pool ended {state}: "
                          f"{(run.state.message or '') if run.state else ''}", "gpu_run", None, retryable=True)


@flow(name="gkd-tune", task_runner=ProcessPoolTaskRunner(max_workers=2),
      timeout_seconds=flow_inputs.flow_timeout("sweep"))
def tune(preset: str, methods: Optional[list[str]] = None, trials: int = 20, workers: int = 2,
         storage: Optional[str] = None, overrides: Optional[dict[str, Any]] = None,
         project_dir: Optional[str] = None, gpu_dispatch: str = "local") -> dict[str, Any]:
    """Search ``methods`` (default: the preset's arms that have a search space) on ``preset``; returns
    ``{"studies": {method: {...}}, "files": {...}}``. ``gpu_dispatch="deployment"`` runs each worker's share of
    trials on the gpu pool (``gkd-tune-trials/gpu``): the data and teacher travel through the DVC remote as a
    sweep's do, and the storage must be one every machine reaches (``$GKD_OPTUNA_STORAGE`` on each)."""
    log = get_run_logger()
    flow_inputs.one_of(gpu_dispatch, ("local", "deployment"), "gpu_dispatch")
    root = flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None)
    flow_inputs.name(preset, "preset")
    if not 1 <= int(trials) <= 10_000 or not 1 <= int(workers) <= 256:
        raise UserError(f"trials={trials}, workers={workers}: expected 1..10000 trials and 1..256 workers")
    if storage is not None and deployment.id is not None:
        raise UserError("storage: a run created through a deployment uses the worker's configured storage")
    base = load_preset(root, preset)
    arms = list(methods) if methods else [m for m in base.arms if m in tuning.SEARCH_SPACES]
    for method in arms:
        flow_inputs.name(method, "methods")
        tuning.search_space(method)
    spec = SweepSpec(name=base.name, arms=tuple(arms), seeds=base.seeds[:1], reference=None,
                     params={**base.params, **(overrides or {})}, description=base.description)
    folder = sweep_root(root, spec)
    out = root / tuning.TUNE_DIR / preset
    url = tuning.storage_url(root, storage)
    # the trials run in the sweep's folder but log to the project's store: set before their processes start
    tracking_env = None if os.environ.get("MLFLOW_TRACKING_URI") else tracking.tracking_uri(root)
    with project_lock.one_writer(folder, f"tune {preset} flow run {flow_run.get_name() or 'local'}"), \
            handoff.env_var("MLFLOW_TRACKING_URI", tracking_env):
        params_file = write_sweep_params(root, spec)
        params = load_params_checked(params_file, check_dataset=False)
        shared_stages(root, spec, share_cache=gpu_dispatch == "local")
        commit = None
        if gpu_dispatch == "deployment":
            if url.startswith("sqlite:") and not os.environ.get(tuning.STORAGE_ENV):
                raise UserError(f"--gpu-dispatch deployment: the gpu workers add trials to the storage they are "
                                f"configured with ({tuning.STORAGE_ENV}); set it here too (or --storage) so both "
                                f"sides share one study, not this project's {url}")
            handoff.Exchange(exchange_url(root, spec.name)).put(folder, list(SHARED_FILES))
            commit = handoff.pinned_commit(root)
        studies: dict[str, Any] = {}
        for method in arms:
            studies[method] = _one_study(root, folder, out, preset, method, params, int(trials), int(workers), url, log,
                                         dict(base.arm_params.get(method, {})), commit)
    rows = [studies[m] for m in arms]
    teacher = teacher_recipe(yaml.safe_load(params_file.read_text()) or {})  # what the trials distilled from
    tuned = tuning.write_tuned(out, {r["method"]: {"overrides": r["overrides"], "fixed": r["fixed"],
                                                    "val_accuracy": r["value"], "trial": r["trial"], "study": r["study"],
                                                    "teacher": teacher}
                                     for r in rows if r["overrides"] is not None})
    with atomic_write(out / "summary.md") as fh:
        fh.write(summary_markdown(preset, rows))
    log.info("tuned settings: %s; summary: %s", tuned, out / "summary.md")
    return {"studies": studies, "files": {"tuned": str(tuned), "summary": str(out / "summary.md")}}


def _one_study(root: Path, folder: Path, out: Path, preset: str, method: str, params: Any, trials: int,
               workers: int, storage: str, log: Any, fixed: Optional[dict[str, Any]] = None,
               gpu_commit: Optional[str] = None) -> dict[str, Any]:
    fixed = {k: v for k, v in (fixed or {}).items() if k != "method.name"}  # the preset's settings of this arm
    name = f"tune-{preset}-{method}"
    study = tuning.open_study(name, storage)
    remaining = max(0, trials - tuning.finished(study))
    log.info("study %s: %d of %d trials done, %d to run on %d worker(s)", name, trials - remaining, trials,
             remaining, min(workers, remaining) if remaining else 0)
    parent = tracking.start_parent_run(root, params, run_name=f"tune-{preset}-{method}", tags={
        "gkd.flow": "tune", "optuna.study": name, "method": method, "preset": preset})
    status = "FAILED"
    try:
        if gpu_commit is None:
            futures = [tune_trials_task.submit(method, str(folder), parent, name, storage, share, trials, worker,
                                               dict(fixed))
                       for worker, share in enumerate(plan(remaining, workers))]
        else:
            futures = [dispatch_trials.submit(preset, method, share, trials, worker, dict(fixed), parent, gpu_commit,
                                              str(folder))
                       for worker, share in enumerate(plan(remaining, workers))]
        for future in futures:
            future.result()
        study = tuning.open_study(name, storage)
        if tuning.finished(study) < trials:
            raise UserError(f"study {name}: {tuning.finished(study)} of {trials} trials in {storage} after the search: "
                            f"the trials went to another storage (every worker's {tuning.STORAGE_ENV} must name this one)")
        states = {s: len([t for t in study.trials if t.state.name == s]) for s in ("COMPLETE", "PRUNED", "FAIL")}
        overrides = tuning.best_overrides(study, method)
        best = study.best_trial if overrides is not None else None
        out.mkdir(parents=True, exist_ok=True)
        pngs = plots(study, out, method)
        run = tracking.StageRun(tracking.get_client(root), parent, root)
        if best is not None:
            run.log_metrics({"best_val_accuracy": best.value})
            run.set_tags({"optuna.best_trial": str(best.number),
                          "optuna.best_params": ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in best.params.items())[:5000]})
        for path in pngs:
            run.log_artifact(path, "tune")
        status = "FINISHED"
    finally:
        tracking.end_run(root, parent, status)
    return {"method": method, "study": name, "trials": trials, "complete": states["COMPLETE"],
            "pruned": states["PRUNED"], "failed": states["FAIL"], "value": best.value if best else None,
            "trial": best.number if best else None, "params": best.params if best else None,
            "overrides": overrides, "fixed": fixed, "plots": [str(p) for p in pngs], "parent_run_id": parent}


def main(
    preset: str = typer.Option(..., help="a preset of sweeps.yaml: its data, teacher and budget"),
    methods: Optional[list[str]] = typer.Option(None, help="methods to tune (default: the preset's tunable arms)"),
    trials: int = typer.Option(20, min=1, max=10_000, help="trials per method (the same for every method)"),
    workers: int = typer.Option(2, min=1, max=256, help="processes adding trials to a study at once"),
    storage: Optional[str] = typer.Option(None, help="Optuna RDB storage URL (default sqlite:///<project>/optuna.db)"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help="a param for every trial: -S key=value"),
    project_dir: Path = typer.Option(Path("."), help="the project folder (params.yaml, sweeps.yaml)"),
    timeout: Optional[int] = typer.Option(None, min=60, help="stop the whole search after this many seconds"),
    gpu_dispatch: str = typer.Option("local", help="local | deployment (each worker's share of trials on the gpu pool)"),
) -> None:
    """Tune each method's settings on the validation split; write reports/tune/<preset>/."""
    flow_cli.install()
    configure_logging()
    root = project_dir.resolve()
    method_list = [m for v in (methods or []) for m in v.replace(",", " ").split()]
    extra = run_cli(lambda: parse_overrides(overrides), report=logger.error)
    options: dict[str, Any] = {"task_runner": ProcessPoolTaskRunner(max_workers=workers)}
    if timeout:
        options["timeout_seconds"] = timeout
    result = flow_cli.run_flow(lambda: tune.with_options(**options)(
        preset, method_list or None, trials, workers, storage, extra, str(root), gpu_dispatch), "tune")
    for method, r in result["studies"].items():
        value = f"{r['value']:.4f}" if r["value"] is not None and math.isfinite(r["value"]) else "-"
        logger.info("%s: best val accuracy %s (trial %s; %d complete, %d pruned, %d failed)", method, value,
                    r["trial"], r["complete"], r["pruned"], r["failed"])
    logger.info("tuned settings in %s", result["files"]["tuned"])


def cli() -> None:
    sys.argv[1:] = expand_multi_values(sys.argv[1:], ("--methods",))  # `--methods a b c`, as README writes it
    typer.run(main)


if __name__ == "__main__":
    cli()
