"""The registered student as an MLflow pyfunc that takes raw images (MLflow "models from code").

This file is logged as the model's code (no pickle): ``mlflow.pyfunc.load_model("models:/gkd-student@champion")``
and ``mlflow models serve`` execute it, and it loads the student from the model's artifacts with
:func:`gkd_core.modelfile.read_model` (``weights_only``: the weights file cannot run code).

Input: a DataFrame with, per row, either a column ``image`` (encoded bytes: PNG, JPEG, ...; base64 text of such
bytes, which is what JSON clients send and what the signature's ``binary`` type decodes) or a column ``pixels``
(a uint8 array: ``H x W`` for a one-channel model, ``H x W x C`` otherwise; the signature's nested array type);
a list of images works too. Over HTTP (``mlflow models serve``, POST /invocations):

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"], ...]}}
    {"inputs": [{"pixels": [[0, 12, ...], ...]}, ...]}       # records: one H x W (x C) array each

(MLflow reads a columnar ``{"inputs": {"pixels": [...]}}`` as one record holding every image, which the
signature refuses: send records.)

The model applies its own preprocessing (colour mode, size, training normalisation; gkd_core.predict).
Output: a DataFrame with ``label`` (class name), ``index``, ``confidence`` and ``probabilities`` (one per class,
in the order of the model's classes; the model's metadata lists them).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

from gkd_core.modelfile import read_model
from gkd_core.predict import classify, images_to_batch, predictions_table

# This file runs where the model is served, with gkd_core (logged as the model's code) but not tasks/: so the
# artifact key is written here too (tasks.registry.MODEL_FILE_ARTIFACT; a test keeps the two equal).
MODEL_FILE_ARTIFACT = "model_file"
COLUMNS = ("image", "pixels")  # encoded bytes (or base64 text) | a uint8 pixel array (tasks/register.py's signature)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, np.ndarray) and value.size == 0)


def images_of(model_input: Any) -> list[Any]:
    """One image per row: the row's ``image`` where present, else its ``pixels``."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame({k: list(v) for k, v in model_input.items() if k in COLUMNS})
    if not isinstance(model_input, pd.DataFrame):
        return list(model_input)
    found = [c for c in COLUMNS if c in model_input.columns]
    if not found:
        raise ValueError(f"expected a column {' or '.join(COLUMNS)}, got {list(model_input.columns)}")
    images = []
    for i, row in enumerate(model_input[found].itertuples(index=False)):
        value = next((v for v in row if _present(v)), None)
        if value is None:
            raise ValueError(f"row {i}: neither {' nor '.join(found)} holds an image")
        images.append(np.asarray(value) if isinstance(value, list) else value)
    return images


class GkdImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.model, self.meta = read_model(context.artifacts[MODEL_FILE_ARTIFACT])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a schema from them
        probs = classify(self.model, self.meta, images_to_batch(images_of(model_input), self.meta))
        return pd.DataFrame([p.__dict__ for p in predictions_table(probs, self.meta.classes)])


mlflow.models.set_model(GkdImageClassifier())
