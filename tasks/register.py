"""Register the student in the MLflow model registry and point alias ``challenger`` at it.

    python -m tasks.register --params params.yaml

The model version holds the PyTorch model (MLflow's pt2 format, with signature and input example) and the
ONNX file next to it (``extra_files/student.onnx``). Its run carries the evaluation metrics (what promotion
compares); the version's tags carry the ONNX parity outcome, the data hash and the git commit. Not a DVC
stage: registration is a side effect, done by the pipeline flow after export_onnx (or by hand).
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import typer
from prefect import task

from tasks import common, tracking
from tasks.stages import EVALUATE_REPORT, EXPORT_REPORT, ONNX, PREPARED, STUDENT, STUDENT_REPORT

logger = logging.getLogger(__name__)
STAGE = "register"
CHALLENGER = "challenger"
INPUT_EXAMPLE_ROWS = 2  # >= 2: torch.export specialises a batch of 1


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model (explicit: MLflow's inference would call pip, offline)."""
    reqs = []
    for pkg in ("torch", "numpy"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def register(
    params_path: str | Path = "params.yaml",
    student_path: str | Path = STUDENT,
    onnx_path: str | Path = ONNX,
    data_path: str | Path = PREPARED,
    evaluate_report: str | Path = EVALUATE_REPORT,
    export_report: str | Path = EXPORT_REPORT,
    student_report: str | Path = STUDENT_REPORT,
    alias: str = CHALLENGER,
    parent_run_id: Optional[str] = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """Log and register the student; returns ``{name, version, run_id, model_uri, alias, onnx_parity, ...}``.

    Every input is checked first (missing reports or models raise StageInputError and nothing is
    registered).
    """
    root = Path(root)
    params = common.load_checked_params(root / params_path, check_dataset=False)
    for path, what, stage in ((student_path, "student model", "distill_student"), (onnx_path, "ONNX model", "export_onnx"),
                              (evaluate_report, "evaluation report", "evaluate"),
                              (export_report, "export report", "export_onnx")):
        common.require_file(root / path, what, stage)
    evaluation = common.read_json(root / evaluate_report)
    export = common.read_json(root / export_report)
    training = common.read_json(root / student_report) if (root / student_report).is_file() else {}
    student, meta = common.load_model_checked(root / student_path, "student model", "distill_student")
    data = common.load_prepared_checked(root / data_path)

    import mlflow
    import torch
    from mlflow.models import infer_signature

    from tasks.export_onnx import example_batch

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in logs
    name = params.mlflow.registered_model_name
    parent_run_id = parent_run_id or os.environ.get(tracking.PARENT_ENV, "").strip() or None
    client = tracking.get_client(root)
    if parent_run_id:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = tracking.ensure_experiment(client, params.mlflow.experiment, root)

    x = example_batch(data, INPUT_EXAMPLE_ROWS)
    with torch.no_grad():
        logits = student(x)
    x_np, logits_np = x.numpy(), logits.numpy()
    parity = "passed" if export.get("passed") else "failed"
    onnx_artifact = f"extra_files/{Path(onnx_path).name}"
    provenance = tracking.base_tags(root)
    tags = {**provenance, "gkd.stage": STAGE, "cached": "false", "method": str(evaluation.get("method")),
            "onnx_parity": parity}
    metrics = common.flatten_numeric({k: v for k, v in evaluation.items() if k != "per_class_accuracy"})
    metrics.update(common.flatten_numeric({f"train_{k}": v for k, v in training.items()
                                           if k in ("best_val_accuracy", "final_val_accuracy", "train_seconds")}))
    metrics["onnx_parity_passed"] = 1.0 if parity == "passed" else 0.0
    if export.get("max_abs_diff") is not None:
        metrics["onnx_max_abs_diff"] = float(export["max_abs_diff"])
    with tracking.fluent_mlflow(client.tracking_uri, experiment_id), \
            mlflow.start_run(experiment_id=experiment_id, run_name=STAGE, tags=tags, parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        mlflow.log_metrics(metrics)
        mlflow.log_params({"registered_model_name": name, "student.model.name": meta["model"]["name"],
                           "student.model.width": meta["model"].get("width"), "classes": len(meta["classes"])})
        for rel in (evaluate_report, export_report):
            mlflow.log_artifact(str(root / rel), "reports")
        info = mlflow.pytorch.log_model(
            student,
            name="model",
            signature=infer_signature(x_np, logits_np),
            input_example=x_np,
            pip_requirements=pip_requirements(),
            extra_files=[str(root / onnx_path)],
            registered_model_name=name,
            metadata={"classes": list(meta["classes"]), "mean": meta["mean"], "std": meta["std"],
                      "image_size": meta["image_size"], "in_channels": meta["in_channels"],
                      "onnx_file": onnx_artifact, "input_name": "input", "output_name": "logits"},
        )
    mv_version = str(info.registered_model_version)
    version_tags = {
        "onnx_parity": parity,
        "onnx_max_abs_diff": export.get("max_abs_diff"),
        "onnx_sha256": export.get("sha256"),
        "onnx_artifact": onnx_artifact,
        "method": evaluation.get("method"),
        "pipeline_run_id": parent_run_id or "",
        **{k: v for k, v in provenance.items() if not k.startswith("mlflow.")},
    }
    for k, v in version_tags.items():
        if v is not None:
            client.set_model_version_tag(name, mv_version, k, str(v))
    metric = params.promote.metric
    client.update_model_version(
        name, mv_version,
        description=(f"{meta['model']['name']} student, method {evaluation.get('method')}: "
                     f"{metric} {evaluation.get(metric)}, ONNX parity {parity}"),
    )
    client.set_registered_model_alias(name, alias, mv_version)
    result = {
        "name": name, "version": mv_version, "run_id": run_id, "alias": alias,
        "model_uri": f"models:/{name}@{alias}", "version_uri": f"models:/{name}/{mv_version}",
        "onnx_parity": parity, "metric": metric, "value": evaluation.get(metric),
    }
    logger.info("registered %s version %s (alias %s; %s %s; ONNX parity %s)", name, mv_version, alias,
                metric, evaluation.get(metric), parity)
    return result


register_task = task(register, name=STAGE, retries=2, retry_delay_seconds=10)

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", "-p", help=common.PARAMS_HELP),
    student: Path = typer.Option(Path(STUDENT), help="student model file"),
    onnx: Path = typer.Option(Path(ONNX), help="the student's ONNX file"),
    data: Path = typer.Option(Path(PREPARED), help="prepared dataset (input example)"),
    alias: str = typer.Option(CHALLENGER, help="alias to point at the new version"),
    parent_run_id: Optional[str] = typer.Option(None, envvar=tracking.PARENT_ENV, help=common.PARENT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Register the student (needs the evaluate and export_onnx outputs)."""
    common.run_cli(lambda: register(params_path, student, onnx, data, alias=alias, parent_run_id=parent_run_id),
                   verbose)


if __name__ == "__main__":
    app()
