"""Hostile and careless input, sent for real: to a real `mlflow models serve` process serving the pipeline's
registered student (Parquet and JSON bodies), and to the installed `gkd predict` command.

What must hold: a request never reads a server file (a path string gets the same one-line answer whether the
file exists or not), every bad input is a 4xx with one line (no traceback, no server path), decompression
bombs and oversized values are refused before they are decoded (the server's and the command's peak memory
stay bounded), `gkd predict` reports unreadable inputs and goes on (a FIFO does not hang it), `--strict`
stops at the first.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from _project import run
from _servers import free_port, http_ok, running, tool_env

pytestmark = pytest.mark.integration
SERVE_TIMEOUT = 300.0
FILE_BYTES = 1_000_000  # the server's GKD_MAX_FILE_BYTES in this test: small, so an oversized value is cheap
BOMB_SIDE = 13_000  # 169 M pixels: 164 KB as PNG, 169 MB decoded (as L; 507 MB as RGB)


def _png(img: np.ndarray | None = None, size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(img) if img is not None else Image.new("L", size)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    data = _png(size=(BOMB_SIDE, BOMB_SIDE))
    assert len(data) < 400_000
    return data


def _post(url: str, body: bytes, content_type: str, timeout: float = 120.0) -> tuple[int, Any, float]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text), time.perf_counter() - t0
        except json.JSONDecodeError:
            return err.code, text, time.perf_counter() - t0


def _json(url: str, payload: dict[str, Any]) -> tuple[int, Any, float]:
    return _post(url, json.dumps(payload).encode(), "application/json")


def _parquet(url: str, frame: pd.DataFrame) -> tuple[int, Any, float]:
    buf = io.BytesIO()
    frame.to_parquet(buf)
    return _post(url, buf.getvalue(), "application/vnd.apache.parquet")


def _peak_rss_mb(pid: int) -> float:
    """The largest peak resident set (VmHWM) of ``pid`` and its descendants, in MiB."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    peaks = [0.0]
    for proc in procs:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


@pytest.fixture(scope="module")
def served(pipeline_run: dict[str, Any], pipeline_project: Path, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = tool_env({"MLFLOW_TRACKING_URI": f"sqlite:///{pipeline_project / 'mlflow.db'}",
                    "GKD_MAX_FILE_BYTES": str(FILE_BYTES)}, drop=("GKD_MLFLOW_PARENT_RUN_ID",))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/gkd-student@challenger",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with running("mlflow models serve", cmd, tmp / "serve.log", env, cwd=tmp,
                 ready=lambda: http_ok(f"{url}/ping"), timeout=SERVE_TIMEOUT) as server:
        yield {"url": f"{url}/invocations", "server": server, "tmp": tmp, "project": pipeline_project}


def _one_line_4xx(status: int, body: Any, project: Path) -> str:
    """The answer is a 4xx whose message is one line that names no server path and carries no traceback."""
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and "stack_trace" not in body, body
    message = body["message"]
    assert "\n" not in message and "Traceback" not in message, message
    for secret in (str(project), "site-packages", sys.prefix):
        assert secret not in message, message
    return message


def test_a_request_never_reads_server_files(served: dict[str, Any]) -> None:
    """A path sent as a Parquet string or a JSON value gets the same answer whether it names a PNG the model
    would classify or a missing file (no file is read, no file-existence oracle); a system file's path is a
    one-line 4xx too. (In JSON, MLflow base64-decodes the signature's binary column itself, leniently, before
    the model sees it: a value that is not base64 at all, like /etc/passwd, gets MLflow's own one-line
    schema error; one with other characters decodes to bytes that are no image, and gets ours.)"""
    from gkd_core.predict import NOT_AN_IMAGE

    real = served["tmp"] / "on-the-server-1.png"
    real.write_bytes(_png(size=(8, 8)))
    missing = served["tmp"] / "on-the-server-2.png"  # same length and characters, no such file
    for transport, send in (
            ("parquet", lambda v: _parquet(served["url"], pd.DataFrame({"image": [v]}))),
            ("json", lambda v: _json(served["url"], {"dataframe_split": {"columns": ["image"], "data": [[v]]}}))):
        answers = [_one_line_4xx(*send(value)[:2], served["project"]) for value in (str(real), str(missing))]
        assert answers[0] == answers[1], (transport, answers)
        if transport == "parquet":  # the string reaches the model as it was sent
            assert answers[0] == f"input 0: {NOT_AN_IMAGE}", answers
        _one_line_4xx(*send("/etc/passwd")[:2], served["project"])


def test_bombs_and_oversized_values_are_refused_before_decoding(served: dict[str, Any], bomb_png: bytes) -> None:
    url, project, pid = served["url"], served["project"], served["server"].popen.pid
    ok = base64.b64encode(_png()).decode()
    status, _, _ = _json(url, {"dataframe_split": {"columns": ["image"], "data": [[ok]]}})
    assert status == 200
    before = _peak_rss_mb(pid)
    bomb = base64.b64encode(bomb_png).decode()
    cases = {
        "pixel bomb (JSON)": _json(url, {"dataframe_split": {"columns": ["image"], "data": [[bomb]]}}),
        "pixel bomb (Parquet bytes)": _parquet(url, pd.DataFrame({"image": [bomb_png]})),
        "oversized value": _json(url, {"dataframe_split": {"columns": ["image"],
                                                           "data": [[base64.b64encode(b"x" * 2 * FILE_BYTES).decode()]]}}),
        "too many rows": _json(url, {"dataframe_split": {"columns": ["image"], "data": [[ok]] * 1025}}),
        "ragged pixels": _json(url, {"inputs": [{"pixels": [[0, 1, 2], [3, 4]]}]}),
        "not an image": _json(url, {"dataframe_split": {"columns": ["image"],
                                                        "data": [[base64.b64encode(b"GIF89a garbage").decode()]]}}),
    }
    grown = _peak_rss_mb(pid) - before
    messages = {}
    for name, (status, body, seconds) in cases.items():
        messages[name] = _one_line_4xx(status, body, project)
        assert seconds < 60, f"{name}: answered after {seconds:.1f} s"
    print(json.dumps({"server peak RSS before MiB": round(before), "growth MiB": round(grown),
                      **{k: v for k, v in messages.items()}}, indent=1))
    assert "13000x13000 = 169,000,000 pixels, over the limit of 40,000,000" in messages["pixel bomb (JSON)"]
    assert "over the limit of 40,000,000" in messages["pixel bomb (Parquet bytes)"]
    assert f"over the limit of {FILE_BYTES:,} bytes per image" in messages["oversized value"]
    assert "1,025 images in one request, over the limit of 1,024" in messages["too many rows"]
    # MLflow's schema check meets a ragged list first (its own one-line 4xx); ours answers where it does not
    assert "inhomogeneous shape" in messages["ragged pixels"] or "not a rectangular array" in messages["ragged pixels"]
    assert "cannot decode image: expected PNG, JPEG" in messages["not an image"]
    assert grown < 100, f"the server's peak RSS grew by {grown:.0f} MiB (one decoded bomb alone is 161 MiB)"
    status, _, _ = _json(url, {"dataframe_split": {"columns": ["image"], "data": [[ok]]}})
    assert status == 200  # and it still serves


# --- gkd predict ---------------------------------------------------------------------------------------------


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read lazily (a 200 MB member without 200 MB in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        k = min(len(buf), self.left)
        buf[:k] = b"\0" * k
        self.left -= k
        return k


# The command's own peak resident memory (VmHWM) on stderr at exit. Not getrusage's ru_maxrss: Linux carries
# it across exec, so a child of a large pytest process would report the parent's peak.
RSS = ("import atexit, pathlib, runpy, sys; atexit.register(lambda: sys.stderr.write('peak_rss_kb=' + next("
       "l.split()[1] for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))"
       " + '\\n')); sys.argv = ['gkd', *sys.argv[1:]]; runpy.run_module('tasks.gkd', run_name='__main__')")


def _gkd(root: Path, *args: str, check: bool = False) -> tuple[Any, int]:
    proc = run([sys.executable, "-c", RSS, "predict", "--model", "models/student.pt", *args], root, check=check,
               timeout=300, env={"COLUMNS": "500"})  # one log record a line (rich wraps at 80 off a terminal)
    peak = [int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("peak_rss_kb=")]
    return proc, peak[-1] // 1024 if peak else -1


def test_gkd_predict_reports_unreadable_inputs_and_goes_on(pipeline_run: dict[str, Any], pipeline_project: Path,
                                                           tmp_path: Path, bomb_png: bytes) -> None:
    from gkd_core.data import load_prepared

    root = pipeline_project
    images = load_prepared(root / "data" / "prepared.pt").test_x[:3].numpy()
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(images):
        (folder / f"good{i}.png").write_bytes(_png(img[0]))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    os.mkfifo(folder / "x.png")  # reading it would block forever
    lone_bomb = tmp_path / "bomb.png"
    lone_bomb.write_bytes(bomb_png)
    archive = tmp_path / "inflates.tar.gz"  # ~200 KB on disk, one 200 MB member
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("a/huge.png")
        info.size = 200 * 2**20
        tf.addfile(info, _Zeros(info.size))
        info = tarfile.TarInfo("a/small.png")
        small = _png(images[0][0])
        info.size = len(small)
        tf.addfile(info, io.BytesIO(small))
    assert archive.stat().st_size < 2**20

    baseline, base_peak = _gkd(root, str(folder / "good0.png"), check=True)
    out = tmp_path / "preds.csv"
    proc, peak = _gkd(root, str(folder), str(lone_bomb), str(archive), str(tmp_path / "missing.png"),
                      "--out", str(out))
    log = proc.stderr
    assert proc.returncode == 0, log[-3000:]
    rows = pd.read_csv(out)
    assert sorted(Path(p).name if ":" not in p else p.split(":")[-1] for p in rows["path"]) == \
        ["a/small.png", "good0.png", "good1.png", "good2.png"]
    assert "skipped 1 entries that are not regular files" in log and "x.png" in log
    for refused in ("corrupt.png: cannot decode image", "169,000,000 pixels, over the limit",
                    "a/huge.png: 209,715,200 bytes, over the limit", "missing.png: no such file or folder"):
        assert refused in log, log[-3000:]
    assert "4 input(s) could not be read" in log
    print(f"gkd predict peak RSS: one image {base_peak} MiB, with the bombs {peak} MiB")
    assert peak - base_peak < 100, f"peak RSS {peak} MiB vs {base_peak} MiB for one image: a bomb was decoded"

    strict, _ = _gkd(root, str(lone_bomb), str(folder / "good0.png"), "--strict", "--out", str(tmp_path / "s.csv"))
    assert strict.returncode == 2
    errors = [line for line in strict.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "over the limit of 40,000,000" in errors[0], strict.stderr[-2000:]
    assert not (tmp_path / "s.csv").exists()
    limited, _ = _gkd(root, str(folder / "good0.png"), "--max-image-pixels", "10")
    assert limited.returncode == 2 and "over the limit of 10 (GKD_MAX_IMAGE_PIXELS)" in limited.stderr
    assert "none of the inputs could be read" in limited.stderr
    assert baseline.returncode == 0
