"""The pipeline as a Prefect flow: the DVC stages in order, then registration (and optionally promotion).

    python -m flows.pipeline                       # whole flow on this machine (temporary Prefect server)
    python -m flows.pipeline --promote             # ... and run the promotion rule at the end

Each stage runs through DVC (``tasks.dvc_ops.run_stage``), so DVC's cache decides what is up to date, exactly
as ``dvc repro`` would. The flow adds: input validation before anything runs, retries where failures can be
transient (data I/O, long training that resumes from its checkpoint, the registry), GPU routing, and one
MLflow parent run with a nested run per stage.

GPU routing: ``train_teacher`` and ``distill_student`` are tagged ``gpu``. With ``gpu_dispatch="local"``
(default) they run here like the rest. With ``gpu_dispatch="deployment"`` each is sent to the
``gkd-stage/gpu`` deployment (work pool "gpu", see flows/deployments.py): this flow pushes the stage's
inputs to the DVC remote, the GPU worker pulls them, runs the stage and pushes its outputs, and this flow
pulls them back. That mode needs a DVC remote and a shared MLflow tracking server.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.runtime import deployment, flow_run
from rich.console import Console
from rich.table import Table

from flows import cli as flow_cli
from flows.prefect_tasks import (
    GPU_STAGES, promote_task, register_task, run_on_gpu_pool, stage_options, stage_task, sweep_point_task,
)
from gkd_core.cli_support import UserError, load_params_checked, run_cli
from gkd_core.methods import METHODS
from tasks import dvc_ops, flow_inputs, handoff, project_lock, tracking
from tasks.dvc_ops import StageFailed
from tasks.cli import configure_logging
from tasks.paths import EVALUATE_REPORT, ONNX, PARAMS_FILE, TEACHER_REPORT, StagePaths
from tasks.reports import read_report
from tasks.stages import STAGE_NAMES

logger = logging.getLogger(__name__)

# The flow's view of dvc.yaml: same stages, same order (tests/integration/test_pipeline.py checks it).
STAGES: tuple[str, ...] = STAGE_NAMES
GPU_DEPLOYMENT = "gkd-stage/gpu"
BASELINES_DIR = "reports/baselines"  # baseline students of `--baselines` (same teacher and seed)


LOCK_ARTIFACT = "gkd-dvc-lock-entry"  # key of the artifact a GPU stage run hands its dvc.lock entry back in
FAILURE_ARTIFACT = "gkd-stage-failure"  # ... and, when it fails with a known cause, that cause


@flow(name="gkd-stage")
def stage_flow(stage: str, project_dir: Optional[str] = None, parent_run_id: Optional[str] = None,
               sync_remote: bool = True, git_commit: Optional[str] = None, params_yaml: Optional[str] = None,
               dvc_lock: Optional[str] = None) -> dict[str, Any]:
    """One stage as its own flow run: what a GPU worker executes (tasks/handoff.py says what travels).

    With ``git_commit``: in a checkout of its own (``handoff.run_checkout``: the worker's checkout,
    ``project_dir`` else ``$GKD_PROJECT_DIR``, cloned at that commit and removed afterwards); without it, in
    the worker's checkout itself. There: write the orchestrator's ``params_yaml`` and ``dvc_lock``, pull the
    stage's inputs from the DVC remote, run the stage through DVC (checkpoints mirrored to the remote), push
    its outputs, and hand the stage's dvc.lock entry back as a Prefect artifact."""
    flow_inputs.one_of(stage, STAGES, "stage")
    flow_inputs.run_id(parent_run_id)
    flow_inputs.commit(git_commit)
    base = flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None)
    what = f"stage {stage} flow run {flow_run.get_name() or 'local'}"
    if git_commit is None:
        with project_lock.one_writer(base, what):
            return _stage_in(base, stage, parent_run_id, sync_remote, params_yaml, dvc_lock)
    with handoff.run_checkout(base, git_commit, f"{stage}-{flow_run.id or 'local'}") as root:
        get_run_logger().info("run checkout %s at commit %s (from %s)", root, git_commit[:12], base)
        return _stage_in(root, stage, parent_run_id, sync_remote, params_yaml, dvc_lock)


def _stage_in(root: Path, stage: str, parent_run_id: Optional[str], sync_remote: bool, params_yaml: Optional[str],
              dvc_lock: Optional[str]) -> dict[str, Any]:
    if sync_remote and handoff.remote_url(root) is None:
        raise UserError(f"{root}: this worker's checkout has no DVC remote to exchange data through: "
                        "`dvc remote add -d <name> <url>` (the one the orchestrating machine pushes to)")
    handoff.write_text(root, PARAMS_FILE, params_yaml)
    handoff.write_text(root, "dvc.lock", dvc_lock)
    upstream = dvc_ops.stage_upstream(str(root)).get(stage, [])
    if sync_remote and upstream:
        dvc_ops.pull(str(root), upstream)
    mirror = f"{handoff.remote_url(root).rstrip('/')}/gkd-checkpoints" if sync_remote else None
    try:
        with handoff.env_var(handoff.MIRROR_ENV, mirror):
            result = stage_task.with_options(**stage_options(stage))(str(root), stage, parent_run_id)
    except (StageFailed, UserError) as err:
        retryable = isinstance(err, StageFailed) and err.retryable
        create_markdown_artifact(markdown=yaml.safe_dump({"error": str(err), "retryable": retryable,
                                                          "exit_code": getattr(err, "exit_code", 2)}),
                                 key=FAILURE_ARTIFACT, description=f"why stage {stage} failed")
        raise
    if sync_remote:
        dvc_ops.push(str(root), [stage])
    entry = handoff.lock_entry(root, stage)
    create_markdown_artifact(markdown=yaml.safe_dump(entry or {}, sort_keys=False), key=LOCK_ARTIFACT,
                             description=f"dvc.lock entry of stage {stage}")
    return {**result, "dvc_lock_entry": entry}


@task(name="gpu-dispatch", **{k: v for k, v in stage_options("distill_student").items() if k != "name"})
def dispatch_to_gpu_pool(root: str, stage: str, parent_run_id: Optional[str]) -> dict[str, Any]:
    """Send ``stage`` to the gpu pool's deployment and wait: its inputs go to the DVC remote, the commit,
    params.yaml and dvc.lock go with the run, the updated dvc.lock entry and the outputs come back. A crashed
    GPU run is retried (the retry resumes from the checkpoint mirrored to the remote); a stage that refused
    its input or diverged is not."""
    project = Path(root)
    commit = handoff.pinned_commit(project)
    upstream = dvc_ops.stage_upstream(root).get(stage, [])
    if upstream:
        dvc_ops.push(root, upstream)
    t0 = time.perf_counter()
    limit = load_params_checked(project / PARAMS_FILE, check_dataset=False).timeouts.gpu_stage
    run = run_on_gpu_pool(GPU_DEPLOYMENT, {
        "stage": stage, "parent_run_id": parent_run_id, "sync_remote": True, "git_commit": commit,
        "params_yaml": handoff.read_text(project, PARAMS_FILE), "dvc_lock": handoff.read_text(project, "dvc.lock")},
        limit, stage)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "without a state"
        cause = _artifact_of(run.id, FAILURE_ARTIFACT)
        if cause:  # the stage refused its input, diverged, or crashed inside: its own words and verdict
            raise StageFailed(stage, f"{cause['error']} (on the gpu pool)", "gpu_run", cause.get("exit_code"),
                              retryable=bool(cause.get("retryable")))
        message = (run.state.message or "").strip().splitlines()[0] if run.state and run.state.message else ""
        raise StageFailed(stage, f"stage {stage} on the gpu pool ended {state}: {message}", "gpu_run", None,
                          retryable=True)  # the worker died or lost its connection: worth another try
    entry = _artifact_of(run.id, LOCK_ARTIFACT)
    if entry:
        handoff.merge_lock_entry(project, stage, entry)
    dvc_ops.pull(root, [stage])
    return {"stage": stage, "ran": None, "cached": None, "seconds": round(time.perf_counter() - t0, 2),
            "flow_run_id": str(run.id)}


def _artifact_of(flow_run_id: Any, key: str) -> Optional[dict[str, Any]]:
    """The YAML a flow run left in its artifact ``key`` (stored by the Prefect server both machines use)."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return yaml.safe_load(artifacts[-1].data) if artifacts else None


def validate_inputs(root: str | Path) -> Any:
    """All cheap checks before anything runs: params.yaml (every field, model names) and the dataset
    source. Raises :class:`gkd_core.cli_support.UserError` with one clear message."""
    root = Path(root)
    for needed in (PARAMS_FILE, "dvc.yaml"):
        if not (root / needed).is_file():
            raise UserError(f"{root / needed}: not found (is {root} the project folder?)")
    params = load_params_checked(root / PARAMS_FILE)
    tracking.check_reachable(root)
    return params


@flow(name="gkd-pipeline", timeout_seconds=flow_inputs.flow_timeout("pipeline"))
def pipeline(
    project_dir: Optional[str] = None,
    register_model: bool = True,
    promote: bool = False,
    gpu_dispatch: Literal["local", "deployment"] = "local",
    baselines: Optional[list[str]] = None,
) -> dict[str, Any]:
    """prepare_data -> train_teacher -> distill_student -> evaluate -> export_onnx (through DVC) -> register.

    Returns ``{"parent_run_id", "stages": [{stage, ran, cached, seconds}], "ran": [...], "registration",
    "promotion", "metrics", "comparison", "tracking_uri"}``. ``baselines`` (method names) are distilled after
    registration with the same teacher and seed, for the comparison table (not registered).
    """
    flow_inputs.one_of(gpu_dispatch, ("local", "deployment"), "gpu_dispatch")
    root = str(flow_inputs.project_dir(project_dir, from_deployment=deployment.id is not None))
    flow_inputs.names(baselines, "baselines")
    with project_lock.one_writer(root, f"pipeline flow run {flow_run.get_name() or 'local'}"):
        return _pipeline(root, register_model, promote, gpu_dispatch, baselines)


def _pipeline(root: str, register_model: bool, promote: bool, gpu_dispatch: str,
              baselines: Optional[list[str]]) -> dict[str, Any]:
    log = get_run_logger()
    paths = StagePaths(Path(root))
    params = validate_inputs(root)
    baselines = [m for m in (baselines or []) if m != params.method.name]
    check_baselines(root, baselines)
    if baselines:
        log.info("after the %d stages and registration: %d baseline(s) for comparison: %s", len(STAGES),
                 len(baselines), ", ".join(baselines))
    if gpu_dispatch == "deployment" and not dvc_ops.has_remote(root):
        raise UserError(
            "gpu_dispatch='deployment' hands data to the GPU workers through a DVC remote, and none is set: "
            "`dvc remote add -d <name> <url>` (s3://, gs://, azure://, ssh://, or a shared directory)")
    parent = tracking.start_parent_run(root, params, run_name=f"pipeline-{flow_run.get_name() or 'local'}",
                                       tags={"gkd.flow": "pipeline", "prefect.flow_run_id": str(flow_run.get_id())})
    status = "FAILED"
    results: list[dict[str, Any]] = []
    registration = decision = None
    comparison: dict[str, Any] = {"teacher": None}
    try:
        for number, stage in enumerate(STAGES, 1):
            log.info("stage %d/%d: %s ...", number, len(STAGES), stage)
            if stage in GPU_STAGES and gpu_dispatch == "deployment":
                results.append(dispatch_to_gpu_pool(root, stage, parent))
            else:
                results.append(stage_task.with_options(**stage_options(stage))(root, stage, parent))
            log.info("%s: %s", stage, {True: "ran", False: "up to date", None: "done on the gpu pool"}[results[-1]["ran"]])
        evaluation = read_report(paths.output(EVALUATE_REPORT))
        comparison["teacher"] = read_report(paths.output(TEACHER_REPORT)).get("test_accuracy")
        tracking.set_run_tags(root, parent, {**tracking.base_tags(root),
                                             "stages_ran": ",".join(r["stage"] for r in results if r["ran"]) or "none"})
        summary = {k: v for k, v in tracking.flatten_numeric(evaluation).items() if not k.startswith("per_class")}
        parent_run = tracking.StageRun(tracking.get_client(root), parent, root)
        parent_run.log_metrics(summary)
        for name in (PARAMS_FILE, "dvc.yaml", "dvc.lock"):
            parent_run.log_file(name)
        if register_model:
            registration = register_task(paths, parent_run_id=parent)
        if promote:  # this run's version, not whatever `challenger` points to by now (another pipeline's)
            decision = promote_task(paths, version=registration["version"] if register_model else None)
        for number, method in enumerate(baselines, 1):  # same teacher, same seed, only the method differs
            log.info("baseline %d/%d: %s (the same teacher, data and seed, only the method differs)", number,
                     len(baselines), method)
            point = sweep_point_task.with_options(tags=["gpu"])(method, params.seed, root, parent,
                                                                points_dir=BASELINES_DIR)
            comparison[method] = point["test_accuracy"]
        comparison[params.method.name] = evaluation.get("test_accuracy")
        status = "FINISHED"
    finally:
        tracking.end_run(root, parent, status)
    return {
        "parent_run_id": parent,
        "stages": results,
        "ran": [r["stage"] for r in results if r["ran"]],
        "registration": registration,
        "promotion": decision,
        "metrics": summary,
        "comparison": comparison,
        "tracking_uri": tracking.tracking_uri(root),
        "project_dir": root,
    }


def check_baselines(root: str | Path, methods: list[str]) -> None:
    """Each baseline method must give valid params (refused with one message before any stage runs)."""
    for method in methods:
        load_params_checked(Path(root) / PARAMS_FILE, {"method.name": method}, check_dataset=False)


def _print_summary(result: dict[str, Any]) -> None:
    table = Table(title="gkd pipeline")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for r in result["stages"]:
        status = "gpu pool" if r["ran"] is None else ("ran" if r["ran"] else "up to date")
        table.add_row(r["stage"], status, f"{r['seconds']:.1f}")
    reg = result.get("registration")
    if reg:
        table.add_row("register", f"{reg['name']} v{reg['version']} @{reg['alias']} (ONNX {reg['onnx_parity']})", "")
    if result.get("promotion"):
        table.add_row("promote", f"{result['promotion']['decision']}: {result['promotion']['reason']}", "")
    metrics = Table(title="student (test split)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for k in ("test_accuracy", "test_top5", "test_ece", "agreement", "teacher_test_accuracy"):
        if k in result["metrics"]:
            metrics.add_row(k, f"{result['metrics'][k]:.4f}")
    console = Console()
    console.print(table)
    console.print(metrics)
    comparison = {k: v for k, v in result.get("comparison", {}).items() if v is not None}
    if len(comparison) > 1:
        cmp_table = Table(title="test accuracy (same data, seed and teacher)")
        cmp_table.add_column("model")
        cmp_table.add_column("what ran")
        cmp_table.add_column("accuracy", justify="right")
        for k, v in comparison.items():
            what = "the teacher (CE)" if k == "teacher" else METHODS[k].summary
            cmp_table.add_row("teacher" if k == "teacher" else f"student ({k})", what, f"{v:.4f}")
        console.print(cmp_table)
    uri = result.get("tracking_uri", "")
    if reg:
        console.print(f"registered: models:/{reg['name']}@{reg['alias']} (version {reg['version']}) in {uri}", soft_wrap=True)
    for line in next_steps(result):
        console.print(line, soft_wrap=True, highlight=False)


def next_steps(result: dict[str, Any]) -> list[str]:
    """The closing block of ``python -m flows.pipeline``: where the outputs are and what to run next."""
    root = Path(result.get("project_dir") or ".")
    uri = result.get("tracking_uri", "")
    ui_uri = uri if uri.startswith("sqlite:") else "<your MLFLOW_TRACKING_URI>"
    reg = result.get("registration")
    model = f"models:/{reg['name']}@{reg['alias'] or 'challenger'}" if reg else "models/student.pt"
    return [
        "next steps:",
        f"  reports      {root / 'reports'}/ (evaluate.json, info/, plots/)   ONNX model: {root / ONNX}",
        "  plots        dvc plots show   -> dvc_plots/index.html (learning curves, w(p), confusion matrix)",
        "  promote      python -m flows.promote   (challenger -> champion when it is better)",
        f"  MLflow UI    .venv/bin/mlflow ui --backend-store-uri {ui_uri}   -> http://127.0.0.1:5000",
        "  Prefect UI   .venv/bin/prefect server start   -> http://127.0.0.1:4200 "
        "(run with PREFECT_API_URL=http://127.0.0.1:4200/api to keep flow runs there)",
        f"  predict      gkd predict --model {model} <images, folders, .tar.gz>   "
        f"(or --model {ONNX}, --split test)",
        "  commit       git add dvc.lock params.yaml && git commit -m '...'   (then `dvc metrics diff`, `dvc push`)",
    ]


def main(
    params: Path = typer.Option(Path(PARAMS_FILE), "--params", "-p",
                                help="the project's params.yaml (its folder is the project: dvc.yaml, outputs)"),
    register: bool = typer.Option(True, help="register the student in MLflow (alias challenger)"),
    promote: bool = typer.Option(False, help="then run the promotion rule (challenger -> champion?)"),
    gpu_dispatch: str = typer.Option("local", help="local | deployment (GPU stages on the gpu work pool)"),
    baselines: str = typer.Option("", help="comma-separated methods to distil too for comparison, e.g. none,kd"),
) -> None:
    """Run the pipeline flow (bad input ends with one message and exit code 2 before any stage runs; a failed
    run ends with its cause as the last line)."""
    flow_cli.install()
    configure_logging()
    root = params.resolve().parent

    def checked_baselines() -> list[str]:
        if params.name != PARAMS_FILE:
            raise UserError(
                f"{params}: dvc.yaml's stages read {PARAMS_FILE} in the project folder; edit that file, or try "
                "values with `dvc exp run -S key=value`")
        if gpu_dispatch not in ("local", "deployment"):
            raise UserError(f"--gpu-dispatch must be local or deployment, got {gpu_dispatch!r}")
        validate_inputs(root)
        methods = [m.strip() for m in baselines.split(",") if m.strip()]
        check_baselines(root, methods)
        return methods

    baseline_list = run_cli(checked_baselines, report=logger.error)
    result = flow_cli.run_flow(lambda: pipeline(str(root), register_model=register, promote=promote,
                                                gpu_dispatch=gpu_dispatch, baselines=baseline_list), "pipeline")
    _print_summary(result)


if __name__ == "__main__":
    typer.run(main)
