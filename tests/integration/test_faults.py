"""Fault injection, as a user (or an attacker) would try it: untrusted model files, wrong teachers, runs that
diverge, chance-level students, concurrent flows against a new store, crashes mid-training.

Each test names the failure it injects and what must hold: no code runs from a model file, one clear line
before any compute, no retry of a deterministic failure and the cause as the last line, no broken model
promoted, nothing lost when flows start together, an exact resume after SIGKILL.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from _project import OFFLINE_ENV, edit_params, run

pytestmark = pytest.mark.integration

# A student that goes non-finite within its first epoch on digits: w <- w - 10 (g + w) multiplies the weights by
# -9 every step (checked: the gradient is NaN at step 15). lr 10 alone only ends at chance (BatchNorm).
DIVERGE = {"student.train.lr": 10.0, "student.train.momentum": 0.0, "student.train.warmup_epochs": 0,
           "student.train.weight_decay": 1.0, "student.train.lr_schedule": "constant"}


class _Payload:
    """Pickled, this calls ``touch <marker>`` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _evil_torch_file(path: Path, marker: Path, fmt: str = "gkd-model/2") -> None:
    torch.save({"format": fmt, "state_dict": {}, "payload": _Payload(marker)}, path)


def _stage(root: Path, stage: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"tasks.{stage}", "--params", "params.yaml", *args], root, check=False,
               env=env or {})


# --- untrusted files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "stage"), [
    ("models/teacher.pt", "distill_student"),
    ("models/student.pt", "evaluate"),
    ("models/student.pt", "export_onnx"),
    ("models/student.pt", "register"),
    ("data/prepared.pt", "train_teacher"),
])
def test_a_model_file_carrying_code_is_refused_by_every_stage(clone_project, tmp_path: Path, target: str,
                                                             stage: str) -> None:
    root = clone_project()
    marker = tmp_path / "pwned"
    _evil_torch_file(root / target, marker, "gkd-prepared-v1" if target.startswith("data") else "gkd-model/2")
    proc = _stage(root, stage)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refused" in proc.stderr and "could run code" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the payload ran"


def test_the_gkd_cli_refuses_a_model_file_carrying_code(clone_project, tmp_path: Path) -> None:
    root = clone_project()
    marker = tmp_path / "pwned"
    _evil_torch_file(tmp_path / "evil.pt", marker)
    proc = run([sys.executable, "-m", "gkd_core.cli", "evaluate", "--model", str(tmp_path / "evil.pt"),
                "--data", "data/prepared.pt"], root, check=False)
    assert proc.returncode == 2 and "refused" in proc.stderr and not marker.exists()


def test_a_resume_checkpoint_carrying_code_is_refused(clone_project, tmp_path: Path) -> None:
    from gkd_core.data import load_prepared
    from tasks.paths import StagePaths

    root = clone_project()
    marker = tmp_path / "pwned"
    params = yaml.safe_load((root / "params.yaml").read_text())
    data = load_prepared(root / "data/prepared.pt")
    ckpt = StagePaths(root).checkpoint(f"student-{params['method']['name']}-seed{params['seed']}", data)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    _evil_torch_file(ckpt, marker, "gkd-checkpoint/2")
    proc = _stage(root, "distill_student")
    assert proc.returncode == 2 and "refused" in proc.stderr and "delete it" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_a_registered_model_file_carrying_code_is_refused(clone_project, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow entry point: the student file in the artifact store replaced by a payload."""
    from gkd_core.modelfile import ModelFileError
    from tasks.paths import StagePaths
    from tasks.register import register
    from tasks.registry import load_student

    root = clone_project()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")  # artifacts under the clone
    uri = register(StagePaths(root))["version_uri"]
    model, meta = load_student(uri, root=root)
    assert model.eval() is model and model.to("cpu") is model  # a torch module users know
    stored = [p for p in (root / "mlartifacts").rglob("student.pt")]
    assert stored, "the model file is among the registered model's artifacts"
    marker = tmp_path / "pwned"
    for path in stored:
        _evil_torch_file(path, marker)
    with pytest.raises(ModelFileError, match="refused"):
        load_student(uri, root=root)
    assert not marker.exists()


# --- files that do not fit the run ---------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "expect"), [
    ({"width": 2.0}, "teacher.model asks for digits_cnn width 1"),
    ({"in_channels": 3}, "takes 3x8x8 images, the prepared data has 1x8x8"),
    ({"num_classes": 5}, "predicts 5 classes"),
    ({"data_hash": "0" * 64}, "was trained on prepared data 000000000000"),
])
def test_a_wrong_teacher_is_one_line_before_any_compute(clone_project, change: dict, expect: str) -> None:
    from gkd_core.data import load_prepared
    from gkd_core.models import build_model
    from gkd_core.modelfile import read_model, save_model
    from gkd_core.sections import ModelConfig

    root = clone_project()
    _, meta = read_model(root / "models/teacher.pt")
    data = load_prepared(root / "data/prepared.pt")

    class Fake:  # the prepared data as the wrong teacher saw it
        num_classes = change.get("num_classes", data.num_classes)
        in_channels = change.get("in_channels", data.in_channels)
        image_size = data.image_size
        image_hw = data.image_hw
        mean = [0.5] * in_channels
        std = [0.25] * in_channels
        classes = [str(i) for i in range(num_classes)]
        meta = {"sha256": change.get("data_hash", data.meta["sha256"])}

    cfg = ModelConfig(name=meta.model.name, width=change.get("width", meta.model.width))
    net = build_model(cfg.name, Fake.num_classes, Fake.in_channels, cfg.width)
    save_model(net, cfg, Fake, root / "models/teacher.pt")
    for stale in ("models/student.pt", "reports/student.json"):
        (root / stale).unlink()
    t0 = time.perf_counter()
    proc = _stage(root, "distill_student")
    assert proc.returncode == 2 and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") < 3
    assert not (root / "models/student.pt").exists()  # nothing written, no training started
    assert time.perf_counter() - t0 < 60


# --- runs that diverge ---------------------------------------------------------------------------------------


def test_a_diverged_run_is_not_retried_and_its_cause_is_the_last_line(clone_project) -> None:
    from mlflow import MlflowClient

    root = clone_project()
    edit_params(root, DIVERGE)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    versions = len(client.search_model_versions("name = 'gkd-student'"))
    downstream = {rel: (root / rel).stat().st_mtime for rel in ("reports/evaluate.json", "models/student.onnx")}
    proc = run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], root, check=False, timeout=900)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert lines[-1].startswith("error: pipeline: stage distill_student failed: training stopped at step"), lines[-3:]
    assert "non-finite gradient" in lines[-1]
    assert proc.stderr.count("stage distill_student: dvc repro") == 1, "a deterministic failure was retried"
    assert {rel: (root / rel).stat().st_mtime for rel in downstream} == downstream  # evaluate, export: not run
    assert len(client.search_model_versions("name = 'gkd-student'")) == versions  # nothing registered


# --- stores and crashes --------------------------------------------------------------------------------------


def test_two_flows_against_a_new_store_both_finish_and_register(pipeline_run: dict[str, Any], clone_project,
                                                                tmp_path: Path) -> None:
    """Scheduled and sweep runs start together: the first use of a new MLflow store must not race."""
    from mlflow import MlflowClient

    roots = [clone_project(), clone_project()]
    for i, root in enumerate(roots):
        edit_params(root, {"export.tolerance": 0.001 * (i + 1)})  # a distinct export: two distinct students
    store = f"sqlite:///{tmp_path / 'new-store.db'}"
    env = {**os.environ, **OFFLINE_ENV, "MLFLOW_TRACKING_URI": store,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for root in roots]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    versions = MlflowClient(store).search_model_versions("name = 'gkd-student'")
    assert len(versions) == 2


def test_sigkill_during_distillation_then_dvc_repro_resumes_to_identical_weights(clone_project, tmp_path: Path) -> None:
    from gkd_core.checkpoints import HOLD_ENV

    root, reference = clone_project(), clone_project()
    change = {"student.train.epochs": 6, "method.gompertz.c": 6.0}
    for r in (root, reference):
        edit_params(r, change)
    run([sys.executable, "-m", "dvc", "repro", "distill_student"], reference, timeout=900)
    # The kill lands at a known point, not against the clock: the run holds after its epoch-2 checkpoint
    # (gkd_core.checkpoints.HOLD_ENV) and is killed while it waits; on an idle machine 6 digits epochs end
    # within a second, so a timed kill would find the run already finished.
    marker = tmp_path / "held-after-epoch-2"
    env = {**os.environ, **OFFLINE_ENV, HOLD_ENV: f"2:{marker}",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "distill_student"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), f"the run never reached its epoch-2 checkpoint: {proc.communicate()[0][-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    first = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL
    assert "epoch 2/6" in first and "epoch 3/6" not in first and not (root / "models/student.pt").exists()
    resumed = run([sys.executable, "-m", "dvc", "repro", "distill_student"], root, timeout=900)
    log = resumed.stderr + resumed.stdout
    assert "at epoch 2/6" in log and "resumed" in log, log[-3000:]
    assert "epoch 1/6" not in log and "epoch 6/6" in log  # epochs 3-6 ran, 1-2 did not run again
    a = torch.load(root / "models/student.pt", weights_only=True)["state_dict"]
    b = torch.load(reference / "models/student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- what holds today, kept holding --------------------------------------------------------------------------


def test_hostile_tar_members_are_skipped_and_the_user_is_told(tmp_path: Path, caplog) -> None:
    """The reader never extracts, but it must not read members whose names leave the archive (``..``, absolute
    paths) or that are links or devices as images either: they are skipped, and the user is told which."""
    import logging

    from PIL import Image

    from gkd_core.data import load_image_folder_raw
    from gkd_core.sections import DatasetConfig

    archive = tmp_path / "evil.tar"
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(red)
    Image.new("RGB", (8, 8), (0, 0, 255)).save(blue)
    with tarfile.open(archive, "w") as tf:
        for name in ("train/a/1.png", "train/b/1.png", "test/a/1.png", "test/b/1.png"):
            tf.add(red if "/a/" in name else blue, arcname=name)
        payload = blue.read_bytes()
        for name in ("../outside.png", "train/a/../../../outside.png", "/train/a/2.png"):
            member = tarfile.TarInfo(name)  # addfile keeps the name as given (add() strips a leading "/")
            member.size = len(payload)
            tf.addfile(member, io.BytesIO(payload))  # blue under class a: a label the skipped ones would poison
        link = tarfile.TarInfo("train/a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("train/a/hard.png")
        hard.type, hard.linkname = tarfile.LNKTYPE, "train/b/1.png"
        tf.addfile(hard)
    with caplog.at_level(logging.WARNING, logger="gkd_core.data.image_folder"):
        raw = load_image_folder_raw(DatasetConfig(name="image_folder", root=str(archive)))
    assert raw.classes == ["a", "b"]
    assert len(raw.train_y) == 2 and len(raw.test_y) == 2  # only the four regular members were read
    a = raw.classes.index("a")
    assert (raw.train_x[raw.train_y == a][:, 0] == 255).all()  # class a holds the red image alone
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "skipped 5 archive members" in warning, warning
    for shown in ("../outside.png", "link.png"):
        assert shown in warning, warning


def test_zero_byte_image_and_missing_root_fail_in_seconds_naming_the_file(tmp_path: Path) -> None:
    from gkd_core.data import DatasetError, prepare_dataset
    from gkd_core.sections import DatasetConfig

    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "tree" / cls / "ok.png")
    (tmp_path / "tree" / "a" / "empty.png").write_bytes(b"")
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="empty.png"):
        prepare_dataset(DatasetConfig(name="image_folder", root=str(tmp_path / "tree")))
    with pytest.raises(DatasetError, match="nowhere"):
        prepare_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path / "nowhere")))
    assert time.perf_counter() - t0 < 30


def test_bad_values_through_dvc_exp_run_are_refused_before_compute(clone_project) -> None:
    root = clone_project()
    proc = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "student.train.lr=-1"], root, check=False)
    assert proc.returncode != 0
    assert "student.train.lr = -1: Input should be greater than 0" in proc.stderr + proc.stdout
    assert "epoch 1/" not in proc.stderr + proc.stdout
