"""`gkd`, the installed command: every command of gkd_core.cli, with ``predict`` also taking MLflow model URIs.

    gkd predict --model models:/gkd-student@champion photos/          # the registered champion
    gkd predict --model models:/gkd-student/3 --split test            # version 3 on the prepared test split
    gkd predict --model models/student.onnx images.tar.gz --out preds.csv

A ``models:/...`` or ``runs:/...`` URI is resolved through the tracking server of ``MLFLOW_TRACKING_URI``
(default: the project's ``sqlite:///mlflow.db``): the registered student's model file is downloaded
(tasks.registry.download_model_file) and read without running code. Everything else is gkd_core.cli's
(``python -m gkd_core.cli`` works without MLflow installed; this module imports MLflow only for a URI).
"""

from __future__ import annotations

import logging

from gkd_core.cli import build_app, open_local_model
from gkd_core.cli_support import UserError
from gkd_core.predict import Predictor, TorchPredictor

logger = logging.getLogger("gkd")
URI_SCHEMES = ("models:/", "runs:/")
MODEL_HELP = ("model to predict with: a gkd model file (.pt), an exported ONNX file (.onnx), or an MLflow model URI "
              "(models:/gkd-student@champion, models:/gkd-student/3, runs:/<run id>/model; MLFLOW_TRACKING_URI, "
              "default sqlite:///mlflow.db)")


def is_model_uri(model: str) -> bool:
    return model.startswith(URI_SCHEMES)


def open_model(model: str, device: str = "cpu") -> Predictor:
    """A local .pt/.onnx file (gkd_core.cli), or the student of an MLflow model URI."""
    if not is_model_uri(model):
        return open_local_model(model, device)
    try:
        # lazy: MLflow is the pipeline's dependency (the `.[pipeline]` extra); a local model file never needs it
        from tasks.registry import downloaded_model_file
    except ImportError as err:
        raise UserError(f"--model {model}: reading an MLflow model URI needs MLflow ({err}); "
                        "`pip install -e '.[pipeline]'`, or pass a local .pt/.onnx file") from None
    import mlflow.exceptions

    try:
        with downloaded_model_file(model) as path:  # the model is read into memory; the copy is removed
            logger.info("%s: model file downloaded (%s)", model, path.name)
            return TorchPredictor.from_file(path, device, source=model)
    except (mlflow.exceptions.MlflowException, FileNotFoundError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model {model}: {first}") from None


app = build_app(open_model, MODEL_HELP)

if __name__ == "__main__":
    app()
