"""The registered student as an MLflow pyfunc that takes raw images (MLflow "models from code").

This file is logged as the model's code (no pickle): ``mlflow.pyfunc.load_model("models:/gkd-student@champion")``
and ``mlflow models serve`` execute it, and it loads the student from the model's artifacts with
:func:`gkd_core.modelfile.read_model` (``weights_only``: the weights file cannot run code).

Input: a DataFrame with a column ``image`` (or a list of images); each image is encoded bytes (PNG, JPEG, ...),
base64 text of such bytes (what JSON clients send), or a uint8 array (``H x W``, ``H x W x C``, ``C x H x W``).
The model applies its own preprocessing (colour mode, size, training normalisation; gkd_core.predict).
Output: a DataFrame with ``label`` (class name), ``index``, ``confidence`` and ``probabilities`` (one per class,
in the order of the model's classes; the model's metadata lists them).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

from gkd_core.modelfile import read_model
from gkd_core.predict import classify, images_to_batch, predictions_table

# This file runs where the model is served, with gkd_core (logged as the model's code) but not tasks/: so the
# artifact key is written here too (tasks.registry.MODEL_FILE_ARTIFACT; a test keeps the two equal).
MODEL_FILE_ARTIFACT = "model_file"


class GkdImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.model, self.meta = read_model(context.artifacts[MODEL_FILE_ARTIFACT])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a schema from them
        images = list(model_input["image"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        probs = classify(self.model, self.meta, images_to_batch(images, self.meta))
        return pd.DataFrame([p.__dict__ for p in predictions_table(probs, self.meta.classes)])


mlflow.models.set_model(GkdImageClassifier())
