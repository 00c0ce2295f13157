"""Reading registered students back: the PyTorch network itself, from any MLflow model URI.

    from tasks.registry import load_student
    model, meta = load_student("models:/gkd-student@champion")     # an nn.Module: .eval(), .to(), ...
    model.eval()

The registered model's artifacts hold the student's model file; it is downloaded (through the tracking
server when MLFLOW_TRACKING_URI is one) and read with :func:`gkd_core.modelfile.read_model`, which never
runs code from the file. ``mlflow.pyfunc.load_model(uri)`` gives the raw-image classifier instead
(tasks/serving_model.py), ``mlflow.onnx.load_model(<version tag onnx_model_uri>)`` the ONNX model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import mlflow

from gkd_core.modelfile import ModelMeta, read_model
from tasks import tracking
from tasks.paths import STUDENT

MODEL_FILE_ARTIFACT = "model_file"  # the pyfunc's artifact key of the student's model file
SERVING_CODE = Path(__file__).with_name("serving_model.py")  # the pyfunc's code (logged as a file, not imported)


def download_model_file(model_uri: str, dst: Optional[str | Path] = None, root: str | Path = ".") -> Path:
    """The student's model file of a registered model (``models:/name@alias``, ``models:/name/3``,
    ``runs:/<id>/model``), downloaded to ``dst`` (a new temporary folder by default)."""
    uri = tracking.tracking_uri(root)
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="gkd-model-"))
    with tracking.fluent_mlflow(uri, None):
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    found = sorted(Path(local).glob(f"artifacts/{Path(STUDENT).name}")) or sorted(Path(local).rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{model_uri}: no gkd model file among its artifacts "
                                f"(artifact key {MODEL_FILE_ARTIFACT!r})")
    return found[0]


def load_student(model_uri: str, root: str | Path = ".") -> tuple[Any, ModelMeta]:
    """``(network in eval mode on CPU, its metadata)`` of a registered student; see the module docstring."""
    return read_model(download_model_file(model_uri, root=root))
