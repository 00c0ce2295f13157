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

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlflow

from gkd_core.modelfile import ModelMeta, read_model
from tasks import tracking
from tasks.paths import STUDENT

MODEL_FILE_ARTIFACT = "model_file"  # the pyfunc's artifact key of the student's model file
SERVING_CODE = Path(__file__).with_name("serving_model.py")  # the pyfunc's code (logged as a file, not imported)
# Version tags written at registration (tasks.register) and compared at promotion (tasks.promote): the data
# and classes a version was evaluated on; scores on other test data are not comparable.
DATA_TAG = "data_sha256"
CLASSES_TAG = "classes_sha256"


def classes_digest(classes: Sequence[str]) -> str:
    """A stable digest of an ordered list of class names (the order is the model's output order)."""
    return hashlib.sha256(json.dumps([str(c) for c in classes]).encode()).hexdigest()


def download_model_file(model_uri: str, dst: str | Path, root: str | Path = ".") -> Path:
    """The student's model file of a registered model (``models:/name@alias``, ``models:/name/3``,
    ``runs:/<id>/model``), downloaded into the folder ``dst``. See :func:`downloaded_model_file` for a
    temporary copy that is removed afterwards."""
    uri = tracking.tracking_uri(root)
    dst = Path(dst)
    with tracking.fluent_mlflow(uri, None):
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    found = sorted(Path(local).glob(f"artifacts/{Path(STUDENT).name}")) or sorted(Path(local).rglob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{model_uri}: no gkd model file among its artifacts "
                                f"(artifact key {MODEL_FILE_ARTIFACT!r})")
    return found[0]


@contextlib.contextmanager
def downloaded_model_file(model_uri: str, root: str | Path = ".") -> Iterator[Path]:
    """The model file of ``model_uri`` in a temporary folder that is removed when the block ends (a daily
    promotion or a ``gkd predict --model models:/...`` leaves nothing behind in the temp directory)."""
    with tempfile.TemporaryDirectory(prefix="gkd-model-") as folder:
        yield download_model_file(model_uri, folder, root)


def load_student(model_uri: str, root: str | Path = ".") -> tuple[Any, ModelMeta]:
    """``(network in eval mode on CPU, its metadata)`` of a registered student; see the module docstring."""
    with downloaded_model_file(model_uri, root) as path:
        return read_model(path)
