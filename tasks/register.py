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
from typing import Any, Mapping, Optional

import mlflow
import torch
from mlflow.models import infer_signature

from gkd_core.cli_support import load_params_checked
from tasks import tracking
from tasks.cli import option, stage_app
from tasks.export_onnx import example_batch
from tasks.inputs import load_model_checked, load_prepared_checked, require_file
from tasks.paths import EVALUATE_REPORT, EXPORT_REPORT, ONNX, PARAMS_FILE, PREPARED, STUDENT, STUDENT_REPORT, StagePaths
from tasks.reports import read_json

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
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    alias: str = CHALLENGER,
) -> dict[str, Any]:
    """Log and register the student; returns ``{name, version, run_id, model_uri, alias, onnx_parity, ...}``.

    Every input is checked first (missing reports or models raise UserError and nothing is registered).
    """
    root = paths.root
    params = load_params_checked(root / params_path, overrides, check_dataset=False)
    for rel, what, stage in ((STUDENT, "student model", "distill_student"), (ONNX, "ONNX model", "export_onnx"),
                             (EVALUATE_REPORT, "evaluation report", "evaluate"),
                             (EXPORT_REPORT, "export report", "export_onnx")):
        require_file(paths.input(rel), what, stage)
    evaluation = read_json(paths.input(EVALUATE_REPORT))
    export = read_json(paths.input(EXPORT_REPORT))
    training = read_json(paths.input(STUDENT_REPORT)) if paths.input(STUDENT_REPORT).is_file() else {}
    data = load_prepared_checked(paths.input(PREPARED))
    student, meta = load_model_checked(paths.input(STUDENT), "student", "distill_student", data,
                                       params.student.model, "student.model")

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in logs
    name = params.mlflow.registered_model_name
    parent_run_id = tracking.parent_from_env(parent_run_id)
    client = tracking.get_client(root)
    experiment_id = tracking.experiment_for(client, params.mlflow.experiment, root, parent_run_id)

    x = example_batch(data, INPUT_EXAMPLE_ROWS)
    with torch.no_grad():
        logits = student(x)
    x_np, logits_np = x.numpy(), logits.numpy()
    parity = "passed" if export.get("passed") else "failed"
    onnx_artifact = f"extra_files/{Path(ONNX).name}"
    provenance = tracking.base_tags(root)
    tags = {**provenance, "gkd.stage": STAGE, "cached": "false", "method": str(evaluation.get("method")),
            "onnx_parity": parity}
    metrics = tracking.flatten_numeric({k: v for k, v in evaluation.items() if k != "per_class_accuracy"})
    metrics.update(tracking.flatten_numeric({f"train_{k}": v for k, v in training.items()
                                           if k in ("best_val_accuracy", "final_val_accuracy", "train_seconds")}))
    metrics["onnx_parity_passed"] = 1.0 if parity == "passed" else 0.0
    if export.get("max_abs_diff") is not None:
        metrics["onnx_max_abs_diff"] = float(export["max_abs_diff"])
    with tracking.fluent_mlflow(client.tracking_uri, experiment_id), \
            mlflow.start_run(experiment_id=experiment_id, run_name=STAGE, tags=tags, parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        mlflow.log_metrics(metrics)
        mlflow.log_params({"registered_model_name": name, "student.model.name": meta.model.name,
                           "student.model.width": meta.model.width, "classes": len(meta.classes)})
        for rel in (EVALUATE_REPORT, EXPORT_REPORT):
            mlflow.log_artifact(str(paths.input(rel)), "reports")
        info = mlflow.pytorch.log_model(
            student,
            name="model",
            signature=infer_signature(x_np, logits_np),
            input_example=x_np,
            pip_requirements=pip_requirements(),
            extra_files=[str(paths.input(ONNX))],
            registered_model_name=name,
            metadata={"classes": list(meta.classes), "mean": meta.mean, "std": meta.std,
                      "image_size": meta.image_size, "in_channels": meta.in_channels,
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
        description=(f"{meta.model.name} student, method {evaluation.get('method')}: "
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


app = stage_app(register, __doc__, option("alias", CHALLENGER, "alias to point at the new version"))

if __name__ == "__main__":
    app()
