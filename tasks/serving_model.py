"""The registered student as an MLflow pyfunc that takes raw images (MLflow "models from code").

This file is logged as the model's code (no pickle): ``mlflow.pyfunc.load_model("models:/gkd-student@champion")``
and ``mlflow models serve`` execute it, and it loads the student from the model's artifacts with
:func:`gkd_core.modelfile.read_model` (``weights_only``: the weights file cannot run code).

Input: a DataFrame with, per row, either a column ``image`` (encoded bytes: PNG, JPEG, ...; base64 text of such
bytes, which is what JSON clients send and what the signature's ``binary`` type decodes) or a column ``pixels``
(a uint8 array: ``H x W`` for a one-channel model, ``H x W x C`` otherwise; the signature's nested array type);
a list of images works too. A string is never read as a file path (a request could read or probe server
files); inputs are bounded before decoding (:mod:`gkd_core.limits`: rows per request, bytes and pixels per
image, set by ``GKD_MAX_*`` in the server's environment). Bad input is answered 400 with one line; a
failure of ours 500, with the traceback in the server's log only. Over HTTP (``mlflow models serve``, POST /invocations):

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG>"], ...]}}
    {"inputs": [{"pixels": [[0, 12, ...], ...]}, ...]}       # records: one H x W (x C) array each

(MLflow reads a columnar ``{"inputs": {"pixels": [...]}}`` as one record holding every image, which the
signature refuses: send records.)

The model applies its own preprocessing (colour mode, size, training normalisation; gkd_core.predict).
Output: a DataFrame with ``label`` (class name), ``index``, ``confidence`` and ``probabilities`` (one per class,
in the order of the model's classes; the model's metadata lists them).
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from gkd_core.limits import LimitError, limits
from gkd_core.modelfile import read_model
from gkd_core.predict import ImageInputError, classify, images_to_batch, predictions_table

# This file runs where the model is served, with gkd_core (logged as the model's code) but not tasks/: so the
# artifact key is written here too (tasks.registry.MODEL_FILE_ARTIFACT; a test keeps the two equal).
MODEL_FILE_ARTIFACT = "model_file"
COLUMNS = ("image", "pixels")  # encoded bytes (or base64 text) | a uint8 pixel array (tasks/register.py's signature)
logger = logging.getLogger("gkd.serving")


class ServingError(MlflowException):
    """One line for the client, whatever MLflow's scoring server does with it: it rewrites an exception's
    ``message`` to ``Failed to predict data '<the whole request>' ...`` (multi-line, echoing every input), so
    this one keeps the message it was given. ``INVALID_PARAMETER_VALUE`` answers 400, ``INTERNAL_ERROR`` 500."""

    def __init__(self, message: str, error_code: int) -> None:
        self._line = " ".join(str(message).split())[:500]
        super().__init__(self._line, error_code=error_code)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, _value: str) -> None:  # MlflowException.__init__ and the scoring server set it
        pass


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and np.isnan(value):
        return False
    return not (isinstance(value, np.ndarray) and value.size == 0)


def images_of(model_input: Any) -> list[Any]:
    """One image per row: the row's ``image`` where present, else its ``pixels``. More rows than the limit
    (:class:`~gkd_core.limits.InputLimits` ``request_rows``) are refused before any is looked at."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame({k: list(v) for k, v in model_input.items() if k in COLUMNS})
    limits().check_rows(len(model_input))
    if not isinstance(model_input, pd.DataFrame):
        return list(model_input)
    found = [c for c in COLUMNS if c in model_input.columns]
    if not found:
        raise ImageInputError(f"expected a column {' or '.join(COLUMNS)}, got {list(map(str, model_input.columns))[:8]}")
    images = []
    for i, row in enumerate(model_input[found].itertuples(index=False)):
        value = next((v for v in row if _present(v)), None)
        if value is None:
            raise ImageInputError(f"row {i}: neither {' nor '.join(found)} holds an image")
        images.append(value)
    return images


class GkdImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.model, self.meta = read_model(context.artifacts[MODEL_FILE_ARTIFACT])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a schema from them
        try:
            batch = images_to_batch(images_of(model_input), self.meta, allow_files=False)
        except (ImageInputError, LimitError) as err:  # the client's input: 400, one line
            raise ServingError(str(err), INVALID_PARAMETER_VALUE) from None
        try:
            probs = classify(self.model, self.meta, batch)
            return pd.DataFrame([p.__dict__ for p in predictions_table(probs, self.meta.classes)])
        except Exception:  # our fault: 500, the details in the server's log only
            logger.exception("prediction failed on a valid batch of %d images", len(batch))
            raise ServingError("internal error while predicting (logged on the server)", INTERNAL_ERROR) from None


mlflow.models.set_model(GkdImageClassifier())
