"""The registered student behind a real `mlflow models serve` (REST, /invocations): base64 PNGs in a
`dataframe_split`, uint8 pixel arrays in `inputs` records; labels and probabilities as the model file gives
them. The server is a process group of its own, stopped at the end whatever happened (tests/_servers.py)."""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from _servers import free_port, http_ok, running, tool_env

pytestmark = pytest.mark.integration
N = 12
SERVE_TIMEOUT = 300.0  # the server's start on 2 busy cores: MLflow import, model download, uvicorn


def _post(url: str, payload: dict[str, Any], timeout: float = 120.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")[-2000:]


def test_mlflow_models_serve_answers_png_and_pixel_requests(pipeline_run: dict[str, Any], pipeline_project: Path,
                                                             tmp_path: Path) -> None:
    from gkd_core.data import load_prepared
    from gkd_core.predict import classify
    from gkd_core.runner import load_model

    data = load_prepared(pipeline_project / "data" / "prepared.pt")
    model, meta = load_model(pipeline_project / "models" / "student.pt")
    images = data.test_x[:N].numpy()
    expected = classify(model, meta, torch.from_numpy(images)).numpy()

    def png(img: np.ndarray) -> str:
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = tool_env({"MLFLOW_TRACKING_URI": f"sqlite:///{pipeline_project / 'mlflow.db'}"},
                   drop=("GKD_MLFLOW_PARENT_RUN_ID",))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/gkd-student@challenger",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    t0 = time.perf_counter()
    with running("mlflow models serve", cmd, tmp_path / "serve.log", env, cwd=tmp_path,
                 ready=lambda: http_ok(f"{url}/ping"), timeout=SERVE_TIMEOUT) as server:
        started = time.perf_counter() - t0
        status, body = _post(f"{url}/invocations",
                             {"dataframe_split": {"columns": ["image"], "data": [[png(img)] for img in images]}})
        assert status == 200, body
        by_png = body["predictions"]
        status, body = _post(f"{url}/invocations", {"inputs": [{"pixels": img[0].tolist()} for img in images]})
        assert status == 200, body
        by_pixels = body["predictions"]
        status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"],
                                                                        "data": [["not base64 at all"]]}})
        assert status >= 400, body  # a bad input is the client's error, with a message
        log = server.output()
    print(f"mlflow models serve: ready after {started:.1f} s")
    classes = list(meta.classes)
    for predictions in (by_png, by_pixels):
        assert len(predictions) == N, log
        assert [p["label"] for p in predictions] == [classes[i] for i in expected.argmax(1)]
        assert [p["index"] for p in predictions] == expected.argmax(1).tolist()
        probs = np.array([p["probabilities"] for p in predictions])
        assert probs.shape == (N, len(classes))
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        np.testing.assert_allclose([p["confidence"] for p in predictions], expected.max(1), atol=1e-5)
