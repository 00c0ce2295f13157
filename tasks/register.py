"""Register the student in the MLflow model registry and point alias ``challenger`` at it.

    python -m tasks.register --params params.yaml

The registered model is a pyfunc that takes raw images and returns labels and probabilities
(tasks/serving_model.py: ``mlflow.pyfunc.load_model(uri).predict(df_with_image_column)``, ``mlflow models
serve``), logged as code (no pickle) with the student's model file as its artifact, a signature (column
``image``: encoded bytes, base64 over JSON; or ``pixels``: a uint8 array) and an input example. The same run logs the ONNX file as an MLflow ONNX model (``runs:/<run>/onnx``, loadable with
``mlflow.onnx.load_model``; version tag ``onnx_model_uri``). PyTorch users load the network itself with
:func:`tasks.registry.load_student` (a real ``nn.Module``: ``.eval()``, ``.to()``; weights read without running
code). The run carries the evaluation metrics (what promotion compares); the version's tags the ONNX parity,
the data hash, the git commit and the content hash.

Registration is idempotent: a student whose model file, evaluation and export reports are unchanged since a
registered version (tag ``gkd.content_sha256``) is not registered again; the result says which version it is.
Not a DVC stage: registration is a side effect, done by the pipeline flow after export_onnx (or by hand).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Optional

import mlflow
import onnx
import pandas as pd
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import Array, ColSpec, DataType, Schema
from PIL import Image

import gkd_core
from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.modelfile import ModelMeta
from gkd_core.predict import classify, predictions_table
from tasks import tracking
from tasks.cli import option, stage_app
from tasks.export_onnx import example_batch
from tasks.inputs import load_model_checked, load_prepared_checked, require_file
from tasks.paths import EVALUATE_REPORT, EXPORT_REPORT, ONNX, PARAMS_FILE, PREPARED, STUDENT, STUDENT_REPORT, StagePaths
from tasks.registry import CLASSES_TAG, DATA_TAG, MODEL_FILE_ARTIFACT, SERVING_CODE, classes_digest
from tasks.reports import file_sha256, read_report

logger = logging.getLogger(__name__)
STAGE = "register"
CHALLENGER = "challenger"
CONTENT_TAG = "gkd.content_sha256"
EXAMPLE_IMAGES = 2


def _requirements(*packages: str) -> list[str]:
    """Pinned requirements of a logged model (explicit: MLflow's inference would call pip, offline)."""
    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def content_sha256(paths: StagePaths) -> str:
    """What makes a registration: the student's model file, ONNX file, evaluation and export reports."""
    h = hashlib.sha256()
    for rel in (STUDENT, ONNX, EVALUATE_REPORT, EXPORT_REPORT):
        h.update(rel.encode())
        h.update(hashlib.sha256(paths.input(rel).read_bytes()).digest())
    return h.hexdigest()


def registered_version(client: Any, name: str, content: str) -> Optional[str]:
    """The version of ``name`` registered from exactly this content, if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.`{CONTENT_TAG}` = '{content}'")
    except mlflow.exceptions.MlflowException:
        return None
    return str(min(int(v.version) for v in versions)) if versions else None


def serving_signature(meta: ModelMeta, images: pd.DataFrame, outputs: pd.DataFrame) -> ModelSignature:
    """The pyfunc's signature: per row an ``image`` (encoded bytes; base64 in JSON) or ``pixels`` (a uint8 array,
    ``H x W`` for a one-channel model, ``H x W x C`` otherwise), both optional columns; the output columns as
    predicted (label, index, confidence, probabilities)."""
    pixel: Any = DataType.long
    for _ in range(2 if meta.in_channels == 1 else 3):
        pixel = Array(pixel)
    inputs = Schema([ColSpec(DataType.binary, "image", required=False), ColSpec(pixel, "pixels", required=False)])
    return ModelSignature(inputs=inputs, outputs=infer_signature(images, outputs).outputs)


def example_images(data: Any, meta: ModelMeta) -> pd.DataFrame:
    """The first test images as PNG bytes: the pyfunc's input example (what a client sends)."""
    rows = []
    for x in data.test_x[:EXAMPLE_IMAGES].numpy():
        img = Image.fromarray(x[0] if meta.in_channels == 1 else x.transpose(1, 2, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append(buf.getvalue())
    return pd.DataFrame({"image": rows})


def check_reports_describe(model: Path, reports: Mapping[str, Mapping[str, Any]]) -> str:
    """The model file's SHA-256, when every report names it as the model it describes (``model_sha256``);
    else UserError: metrics of other weights (a concurrent run, a stale report) are never registered."""
    actual = file_sha256(model)
    for rel, report in reports.items():
        described = report.get("model_sha256")
        if described != actual:
            what = f"weights {str(described)[:12]}" if described else "no model_sha256 (written by an older version)"
            raise UserError(f"{rel} describes {what}, but {model} is {actual[:12]}: the report is not of this "
                            "model; rerun the stages after distill_student (`dvc repro`)")
    return actual


def register(
    paths: StagePaths = StagePaths(),
    params_path: str | Path = PARAMS_FILE,
    overrides: Optional[Mapping[str, Any]] = None,
    parent_run_id: Optional[str] = None,
    alias: str = CHALLENGER,
) -> dict[str, Any]:
    """Log and register the student; returns ``{name, version, registered, run_id, model_uri, alias, ...}``.

    Every input is checked first (missing reports or models raise UserError and nothing is registered).
    """
    root = paths.root
    params = load_params_checked(root / params_path, overrides, check_dataset=False)
    for rel, what, stage in ((STUDENT, "student model", "distill_student"), (ONNX, "ONNX model", "export_onnx"),
                             (EVALUATE_REPORT, "evaluation report", "evaluate"),
                             (EXPORT_REPORT, "export report", "export_onnx")):
        require_file(paths.input(rel), what, stage)
    evaluation = read_report(paths.input(EVALUATE_REPORT))
    export = read_report(paths.input(EXPORT_REPORT))
    training = read_report(paths.input(STUDENT_REPORT)) if paths.input(STUDENT_REPORT).is_file() else {}
    data = load_prepared_checked(paths.input(PREPARED))
    student, meta = load_model_checked(paths.input(STUDENT), "student", "distill_student", data,
                                       params.student.model, "student.model")  # a hostile file is named so first
    check_reports_describe(paths.input(STUDENT), {EVALUATE_REPORT: evaluation, EXPORT_REPORT: export})

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in logs
    name = params.mlflow.registered_model_name
    metric = params.promote.metric
    parity = "passed" if export.get("passed") else "failed"
    content = content_sha256(paths)
    client = tracking.get_client(root)
    existing = registered_version(client, name, content)
    if existing is not None:
        logger.info("student unchanged since %s version %s (same model, ONNX and reports): not registered again",
                    name, existing)
        return {"name": name, "version": existing, "registered": False, "run_id": None, "alias": None,
                "model_uri": f"models:/{name}/{existing}", "version_uri": f"models:/{name}/{existing}",
                "onnx_parity": parity, "metric": metric, "value": evaluation.get(metric)}

    parent_run_id = tracking.parent_from_env(parent_run_id)
    experiment_id = tracking.experiment_for(client, params.mlflow.experiment, root, parent_run_id)
    provenance = tracking.base_tags(root)
    tags = {**provenance, "gkd.stage": STAGE, "cached": "false", "method": str(evaluation.get("method")),
            "onnx_parity": parity}
    metrics = tracking.flatten_numeric({k: v for k, v in evaluation.items() if k != "per_class_accuracy"})
    metrics.update(tracking.flatten_numeric({f"train_{k}": v for k, v in training.items()
                                             if k in ("best_val_accuracy", "final_val_accuracy", "train_seconds")}))
    metrics["onnx_parity_passed"] = 1.0 if parity == "passed" else 0.0
    if export.get("max_abs_diff") is not None:
        metrics["onnx_max_abs_diff"] = float(export["max_abs_diff"])
    images = example_images(data, meta)
    outputs = pd.DataFrame([p.__dict__ for p in predictions_table(
        classify(student, meta, data.test_x[:EXAMPLE_IMAGES]), meta.classes)])
    onnx_example = example_batch(data, EXAMPLE_IMAGES).numpy()
    with tracking.fluent_mlflow(client.tracking_uri, experiment_id), \
            mlflow.start_run(experiment_id=experiment_id, run_name=STAGE, tags=tags, parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        mlflow.log_metrics(metrics)
        mlflow.log_params({"registered_model_name": name, "student.model.name": meta.model.name,
                           "student.model.width": meta.model.width, "classes": len(meta.classes),
                           "objective": str(training.get("objective", ""))[:500]})
        for rel in (EVALUATE_REPORT, EXPORT_REPORT):
            mlflow.log_artifact(str(paths.input(rel)), "reports")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),  # models from code: the file is logged, nothing is pickled
            artifacts={MODEL_FILE_ARTIFACT: str(paths.input(STUDENT))},
            code_paths=[str(Path(gkd_core.__file__).parent)],
            signature=serving_signature(meta, images, outputs),
            input_example=images,
            pip_requirements=_requirements("torch", "torchvision", "numpy", "pandas", "pillow", "pydantic",
                                           "POT", "scipy", "scikit-learn", "PyYAML", "mlflow"),
            registered_model_name=name,
            metadata={"classes": list(meta.classes), "mean": meta.mean, "std": meta.std,
                      "input": [meta.in_channels, *meta.input_hw], "model": meta.model.model_dump()},
        )
        onnx_info = mlflow.onnx.log_model(
            onnx.load(str(paths.input(ONNX))), name="onnx", input_example=onnx_example,
            pip_requirements=_requirements("onnx", "onnxruntime", "numpy"),
            metadata={"classes": list(meta.classes), "mean": meta.mean, "std": meta.std,
                      "input": [meta.in_channels, *meta.input_hw], "note": "input: normalised float32 NCHW"},
        )
    mv_version = str(info.registered_model_version)
    version_tags = {
        CONTENT_TAG: content,
        "onnx_parity": parity,
        "onnx_max_abs_diff": export.get("max_abs_diff"),
        "onnx_sha256": export.get("sha256"),
        "onnx_model_uri": onnx_info.model_uri,
        "method": evaluation.get("method"),
        DATA_TAG: meta.data_hash,  # what promotion compares: scores on the same data and classes only
        CLASSES_TAG: classes_digest(meta.classes),
        "pipeline_run_id": parent_run_id or "",
        **{k: v for k, v in provenance.items() if not k.startswith("mlflow.")},
    }
    for k, v in version_tags.items():
        if v is not None:
            client.set_model_version_tag(name, mv_version, k, str(v))
    client.update_model_version(
        name, mv_version,
        description=(f"{meta.model.name} student, method {evaluation.get('method')}: "
                     f"{metric} {evaluation.get(metric)}, ONNX parity {parity}"),
    )
    client.set_registered_model_alias(name, alias, mv_version)
    result = {
        "name": name, "version": mv_version, "registered": True, "run_id": run_id, "alias": alias,
        "model_uri": f"models:/{name}@{alias}", "version_uri": f"models:/{name}/{mv_version}",
        "onnx_model_uri": onnx_info.model_uri, "onnx_parity": parity, "metric": metric,
        "value": evaluation.get(metric),
    }
    logger.info("registered %s version %s (alias %s; %s %s; ONNX parity %s)", name, mv_version, alias,
                metric, evaluation.get(metric), parity)
    return result


app = stage_app(register, __doc__, option("alias", CHALLENGER, "alias to point at the new version"))

if __name__ == "__main__":
    app()
