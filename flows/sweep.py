"""The comparison, one command: arms x seeds with one shared teacher, then the table (tasks/sweep.py).

    python -m flows.sweep --preset fashion-mnist                      # a preset of sweeps.yaml
    python -m flows.sweep --methods none kd linear gompertz --seeds 0 1 2 -S student.train.epochs=5
    python -m flows.sweep --preset digits-smoke --workers 2

A preset names its arms, seeds, reference arm and params overrides; without one, ``--methods``/``--seeds``
(space- or comma-separated) and ``-S key=value`` define a sweep called ``custom`` (``--name`` renames it).
The data and the teacher are prepared once in ``reports/sweep/<name>/``, then the points run as parallel
Prefect tasks in processes of their own (``--workers``), each logged to MLflow under one parent run. Finished
points are skipped when the sweep is run again (after an interruption, or with more seeds); a progress bar
counts the points. The comparison lands in ``reports/sweep/<name>/comparison.{md,json,png}`` and, for a preset
(``--publish NAME`` for any sweep, ``--no-publish`` to skip), in the committed ``docs/results/<preset>/`` with a
summary per point (``points/<arm>-seed<n>.json``: metrics, validation curve, loss terms, fingerprint).

Why tasks rather than ``dvc exp run``: every point shares one teacher (an experiment per seed would retrain
it), points run in parallel without a git commit per experiment, and each is a retryable task in the flow.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
from prefect import flow, get_run_logger, task
from prefect.futures import as_completed
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ProcessPoolTaskRunner
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows import cli as flow_cli
from flows.prefect_tasks import run_on_gpu_pool, stage_options, sweep_point_task
from gkd_core.cli_support import UserError, load_params_checked, parse_overrides, run_cli
from tasks import flow_inputs, handoff, project_lock, tracking
from tasks.cli import configure_logging
from tasks.dvc_ops import StageFailed
from tasks.paths import PARAMS_FILE, StagePaths
from tasks.sweep import (
    POINTS, RESULTS_DIR, SHARED_FILES, SWEEP_DIR, SweepSpec, compare, load_preset, point_figures, point_reports,
    recipe_differences, resolved_params, shared_stages, sweep_point, sweep_root, teacher_figures, teacher_recipe,
    write_comparison, write_sweep_params,
)

logger = logging.getLogger(__name__)
DEFAULT_METHODS = ("none", "kd", "gompertz")
DEFAULT_SEEDS = (0, 1, 2)
MULTI_VALUE = ("--methods", "--seeds")


SWEEP_POINT_DEPLOYMENT = "gkd-sweep-point/gpu"


@flow(name="gkd-sweep-point")
def sweep_point_flow(sweep_name: str, arm: str, seed: int, project_dir: Optional[str] = None,
                     parent_run_id: Optional[str] = None, git_commit: Optional[str] = None,
                     arm_params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One sweep point on a GPU worker, in a checkout of its own at ``git_commit`` (``handoff.run_checkout``;
    without a commit, in the worker's checkout): the sweep's shared files (params, data, teacher) fetched from
    the exchange of this worker's own DVC remote (``<remote>/gkd-sweeps/<sweep_name>``, never a URL from the
    caller), the point distilled and evaluated, its reports sent back there."""
    flow_inputs.name(sweep_name, "sweep_name")
    flow_inputs.name(arm, "arm")
    flow_inputs.run_id(parent_run_id)
    flow_inputs.commit(git_commit)
    base = flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None)
    if git_commit is None:
        return _point_in(base, sweep_name, arm, seed, parent_run_id, arm_params)
    with handoff.run_checkout(base, git_commit, f"point-{arm}-seed{seed}-{flow_run.id or 'local'}") as root:
        get_run_logger().info("run checkout %s at commit %s (from %s)", root, git_commit[:12], base)
        return _point_in(root, sweep_name, arm, seed, parent_run_id, arm_params)


def exchange_url(root: Path, sweep_name: str) -> str:
    """Where a sweep's shared files and points' reports travel: ``<root>'s default DVC remote>/gkd-sweeps/<name>``."""
    url = handoff.remote_url(root)
    if url is None:
        raise UserError(f"{root}: a sweep on the gpu pool sends its data through the DVC remote, and none is set: "
                        "`dvc remote add -d <name> <url>` (the same on every machine)")
    return f"{url.rstrip('/')}/gkd-sweeps/{sweep_name}"


def _point_in(root: Path, sweep_name: str, arm: str, seed: int, parent_run_id: Optional[str],
              arm_params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    folder = root / SWEEP_DIR / sweep_name
    ex = handoff.Exchange(exchange_url(root, sweep_name))
    ex.get(folder, list(SHARED_FILES))
    point = sweep_point(arm, seed, str(folder), parent_run_id, arm_params=arm_params)
    ex.put(folder, point_reports(arm, seed))
    return point


@task(name="sweep-point-on-gpu", **{k: v for k, v in stage_options("distill_student").items()
                                    if k not in ("name", "tags")})
def dispatch_point(spec_name: str, arm: str, seed: int, exchange: str, folder: str, parent_run_id: Optional[str],
                   git_commit: str, arm_params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run one point on the gpu pool and wait; its reports come back through the exchange."""
    limit = load_params_checked(Path(folder) / PARAMS_FILE, check_dataset=False).timeouts.gpu_stage
    run = run_on_gpu_pool(SWEEP_POINT_DEPLOYMENT, {
        "sweep_name": spec_name, "arm": arm, "seed": seed, "parent_run_id": parent_run_id, "git_commit": git_commit,
        **({"arm_params": dict(arm_params)} if arm_params else {})}, limit, f"{arm}-seed{seed}")
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "without a state"
        raise StageFailed(f"{arm}-seed{seed}", f"sweep point {arm}-seed{seed} on the gpu pool ended {state}: "
                          f"{(run.state.message or '') if run.state else ''}", "gpu_run", None, retryable=True)
    handoff.Exchange(exchange).get(Path(folder), point_reports(arm, seed))
    return point_figures(arm, seed, StagePaths(Path(folder), Path(POINTS) / f"{arm}-seed{seed}"), skipped=False)


@flow(name="gkd-sweep", task_runner=ProcessPoolTaskRunner(max_workers=2), timeout_seconds=flow_inputs.flow_timeout("sweep"))
def sweep(spec: Optional[SweepSpec] = None, project_dir: Optional[str] = None,
          threads_per_worker: Optional[int] = None, show_progress: bool = False,
          preset: Optional[str] = None, gpu_dispatch: str = "local", publish: Optional[str] = None) -> dict[str, Any]:
    """Run the sweep ``spec`` (or the preset ``preset``); returns ``{"parent_run_id", "points", "files",
    "table"}``. Use ``sweep.with_options(task_runner=ProcessPoolTaskRunner(max_workers=n))`` for another
    parallelism. ``gpu_dispatch="deployment"`` runs every point on the gpu pool (``gkd-sweep-point/gpu``): the
    shared data and teacher travel through ``<DVC remote>/gkd-sweeps/<name>/``, the points' reports back.
    ``publish`` (a name) also writes the comparison and the points' summaries to ``docs/results/<publish>/``,
    the committed copy docs/results.md is generated from (tasks/results_doc.py)."""
    flow_inputs.one_of(gpu_dispatch, ("local", "deployment"), "gpu_dispatch")
    if publish is not None:
        flow_inputs.name(publish, "publish")
    root = flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None)
    if spec is None:
        if not preset:
            raise UserError("a sweep needs a spec or a preset name")
        spec = load_preset(root, flow_inputs.name(preset, "preset"))
    # one sweep per folder: a second one of the same name would rewrite the first's params and teacher
    with project_lock.one_writer(sweep_root(root, spec), f"sweep {spec.name} flow run {flow_run.get_name() or 'local'}"):
        return _sweep(root, spec, threads_per_worker, show_progress, gpu_dispatch,
                      root / RESULTS_DIR / publish if publish else None)


def _sweep(root: Path, spec: SweepSpec, threads_per_worker: Optional[int], show_progress: bool,
           gpu_dispatch: str, publish: Optional[Path]) -> dict[str, Any]:
    # the points' stages run in the sweep's folder but log to the project's store (under this parent run); set
    # before any point process starts, so they inherit it, and restored afterwards
    with handoff.env_var("MLFLOW_TRACKING_URI", None if os.environ.get("MLFLOW_TRACKING_URI") else
                         tracking.tracking_uri(root)):
        return _sweep_points(root, spec, threads_per_worker, show_progress, gpu_dispatch, publish)


def _sweep_points(root: Path, spec: SweepSpec, threads_per_worker: Optional[int], show_progress: bool,
                  gpu_dispatch: str, publish: Optional[Path]) -> dict[str, Any]:
    log = get_run_logger()
    params_file = write_sweep_params(root, spec)
    folder = sweep_root(root, spec)
    params = load_params_checked(params_file, check_dataset=False)
    parent = tracking.start_parent_run(root, params, run_name=f"sweep-{spec.name}", tags={
        "gkd.flow": "sweep", "sweep": spec.name, "arms": ",".join(spec.arms), "seeds": ",".join(map(str, spec.seeds))})
    status = "FAILED"
    try:
        shared = shared_stages(root, spec, parent, share_cache=gpu_dispatch == "local")
        log.info("sweep %s: data and teacher %s (teacher test accuracy %.4f)", spec.name,
                 "prepared now" if shared["ran"] else "reused", shared["teacher"].get("test_accuracy", float("nan")))
        if gpu_dispatch == "deployment":
            exchange = exchange_url(root, spec.name)
            handoff.Exchange(exchange).put(folder, list(SHARED_FILES))
            commit = handoff.pinned_commit(root)
            futures = [dispatch_point.submit(spec.name, arm, seed, exchange, str(folder), parent, commit,
                                             spec.arm_params.get(arm))
                       for arm in spec.arms for seed in spec.seeds]
        else:
            futures = [sweep_point_task.submit(arm, seed, str(folder), parent, threads_per_worker,
                                               arm_params=spec.arm_params.get(arm))
                       for arm in spec.arms for seed in spec.seeds]
        points = []
        with _progress(show_progress) as bar:
            task = bar.add_task(f"sweep {spec.name}", total=len(futures))
            for future in as_completed(futures):
                point = future.result()
                points.append(point)
                bar.advance(task)
                log.info("point %s-seed%d: test %.4f%s", point["arm"], point["seed"], point["test_accuracy"],
                         " (already done)" if point["skipped"] else "")
        table = compare(points, spec, teacher_figures(folder))
        files = write_comparison(table, folder, publish)
        run = tracking.StageRun(tracking.get_client(root), parent, root)
        for path in files.values():
            run.log_artifact(path, "sweep")
        status = "FINISHED"
    finally:
        tracking.end_run(root, parent, status)
    log.info("sweep of %d points done: %s", len(points), files["md"])
    return {"parent_run_id": parent, "points": points, "files": files, "table": table}


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


def expand_multi_values(argv: Sequence[str], options: Sequence[str] = MULTI_VALUE) -> list[str]:
    """``--methods a b c`` -> ``--methods a --methods b --methods c`` (the README's form; typer takes one value
    per flag); values end at the next token that starts with ``-``."""
    out, current = [], None
    for token in argv:
        if token in options:
            current = token
            continue
        if current is not None and not token.startswith("-"):
            out += [current, token]
            continue
        current = None
        out.append(token)
    return out


def _split(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def build_spec(root: Path, preset: Optional[str], methods: Optional[list[str]], seeds: Optional[list[str]],
               overrides: Optional[list[str]], name: Optional[str], reference: Optional[str],
               tuned: bool = False) -> SweepSpec:
    """The sweep the command line asks for: a preset (``--methods``/``--seeds``/``-S`` refine it) or a custom one.
    ``tuned`` adds an arm ``<method>-tuned`` per method of ``reports/tune/<preset>/tuned.yaml`` (flows.tune),
    next to the arms at the defaults."""
    try:
        seed_list = [int(s) for s in _split(seeds)]
    except ValueError:
        raise UserError(f"--seeds must be integers, got {seeds!r}") from None
    base = load_preset(root, preset) if preset else SweepSpec(name="custom", arms=DEFAULT_METHODS,
                                                               seeds=DEFAULT_SEEDS, reference="kd")
    named = _split(methods)
    picked_tuned = [m for m in named if m.endswith("-tuned")]  # `--methods kd gompertz-tuned`: tuned arms by name
    if picked_tuned and not tuned:
        raise UserError(f"--methods {' '.join(picked_tuned)}: a tuned arm needs --tuned")
    arms = tuple(m for m in named if not m.endswith("-tuned")) or (() if picked_tuned else base.arms)
    arm_params: dict[str, dict[str, Any]] = {a: dict(v) for a, v in base.arm_params.items() if a in arms}
    if tuned:
        from tasks.tune import TUNE_DIR, read_tuned  # optuna: imported only for a tuned sweep

        if not preset:
            raise UserError("--tuned reads reports/tune/<preset>/tuned.yaml: name the --preset that was tuned")
        # a tuned arm runs as its trials ran: the arm's settings the search held fixed, then what it chose
        entries = {method: entry for method, entry in read_tuned(root / TUNE_DIR / preset).items()
                   if (f"{method}-tuned" in picked_tuned if picked_tuned else not named or method in arms)}
        _same_teacher(root / TUNE_DIR / preset, entries,
                      lambda: resolved_params(root, {**base.params, **parse_overrides(overrides)}))
        tuned_arms = {f"{method}-tuned": {**dict(entry.get("fixed") or {}), **dict(entry["overrides"]),
                                          "method.name": method}
                      for method, entry in entries.items()}
        missing = sorted(set(picked_tuned) - set(tuned_arms))
        if missing or not tuned_arms:
            raise UserError(f"{root / TUNE_DIR / preset}: no tuned settings for {missing or list(arms)}")
        arm_params.update(tuned_arms)
        arms = (*arms, *tuned_arms)
    reference = reference or (base.reference if base.reference in arms else None)
    # a tuned arm against its own defaults, and the primary comparison again between tuned arms (exploratory)
    tuned_pairs = [(a, a.removesuffix("-tuned")) for a in arm_params
                   if a.endswith("-tuned") and a.removesuffix("-tuned") in arms]
    if base.primary and all(f"{m}-tuned" in arm_params for m in base.primary):
        tuned_pairs.append((f"{base.primary[0]}-tuned", f"{base.primary[1]}-tuned"))
    return SweepSpec(name=name or base.name, arms=arms, seeds=tuple(seed_list) or base.seeds, reference=reference,
                     params={**base.params, **parse_overrides(overrides)}, description=base.description,
                     arm_params=arm_params, contrasts=(*base.contrasts, *tuned_pairs), primary=base.primary)


def _same_teacher(folder: Path, entries: dict[str, Any], resolved: Callable[[], dict[str, Any]]) -> None:
    """Tuned settings apply to the teacher they were chosen against: refuse an entry whose recorded teacher
    recipe (seed, dataset, teacher; flows.tune writes it) differs from this sweep's (``resolved()``: its params),
    naming the keys; an entry from before recipes were recorded is applied with a warning."""
    here = teacher_recipe(resolved()) if any(e.get("teacher") is not None for e in entries.values()) else {}
    for method, entry in entries.items():
        recorded = entry.get("teacher")
        if recorded is None:
            logger.warning("%s: %s's settings carry no teacher recipe (tuned before it was recorded); applied to "
                           "this sweep's teacher unchecked", folder / "tuned.yaml", method)
            continue
        changed = recipe_differences(recorded, here)
        if changed:
            raise UserError(f"{folder / 'tuned.yaml'}: {method}'s settings were tuned against another teacher "
                            f"({'; '.join(changed)}, tuned -> this sweep); re-tune (python -m flows.tune --preset "
                            f"{folder.name}) or sweep without --tuned")


def main(
    preset: Optional[str] = typer.Option(None, help="a preset of sweeps.yaml (fashion-mnist, cifar10-cpu, ...)"),
    methods: Optional[list[str]] = typer.Option(None, help="arms (method names): --methods none kd gompertz; with "
                                                "--tuned, <method>-tuned names a tuned arm (default: each arm's)"),
    seeds: Optional[list[str]] = typer.Option(None, help="student seeds: --seeds 0 1 2"),
    overrides: Optional[list[str]] = typer.Option(None, "--set", "-S", help="a param for every point: -S key=value"),
    name: Optional[str] = typer.Option(None, help="the sweep's folder under reports/sweep (default: the preset)"),
    reference: Optional[str] = typer.Option(None, help="the arm paired differences are taken against (default kd)"),
    project_dir: Path = typer.Option(Path("."), help="the project folder (params.yaml, sweeps.yaml)"),
    workers: int = typer.Option(2, min=1, help="points run in parallel (processes)"),
    gpu_dispatch: str = typer.Option("local", help="local | deployment (points on the gpu work pool)"),
    tuned: bool = typer.Option(False, help="add the settings flows.tune found: an arm <method>-tuned per method"),
    publish: Optional[str] = typer.Option(None, help="also write the comparison to docs/results/<name>/ (default: "
                                          "the preset's name, -tuned added with --tuned; none for a custom sweep)"),
    no_publish: bool = typer.Option(False, "--no-publish", help="write the comparison under reports/sweep only"),
) -> None:
    """Run a sweep of arms x seeds and print the comparison table."""
    flow_cli.install()
    configure_logging()
    root = project_dir.resolve()

    def checked() -> SweepSpec:
        if not (root / PARAMS_FILE).is_file():
            raise UserError(f"{root / PARAMS_FILE}: not found (is {root} the project folder?)")
        if gpu_dispatch not in ("local", "deployment"):
            raise UserError(f"--gpu-dispatch must be local or deployment, got {gpu_dispatch!r}")
        spec = build_spec(root, preset, methods, seeds, overrides, name, reference, tuned)
        write_sweep_params(root, spec)
        return spec

    spec = run_cli(checked, report=logger.error)
    published = None if no_publish else (publish or (f"{preset}-tuned" if tuned else preset) if preset else publish)
    threads = max(1, (os.cpu_count() or 1) // workers)
    result = flow_cli.run_flow(lambda: sweep.with_options(task_runner=ProcessPoolTaskRunner(max_workers=workers))(
        spec, str(root), threads, show_progress=True, gpu_dispatch=gpu_dispatch, publish=published), "sweep")
    Console().print(Markdown(Path(result["files"]["md"]).read_text()))


def cli() -> None:
    sys.argv[1:] = expand_multi_values(sys.argv[1:])
    typer.run(main)


if __name__ == "__main__":
    cli()
