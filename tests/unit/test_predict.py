"""`gkd predict`: image files, folders and tar archives (the image_folder dataset's reading rules), a prepared
split, .pt and .onnx models (the ONNX file carries the model's metadata), CSV / JSON / printed output, and one
message with exit code 2 for what the user can fix. The pipeline-level checks (the evaluate stage's numbers,
the registered models:/ URI) are in tests/integration/test_predict_cli.py."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gkd_core.cli import app
from gkd_core.config import DatasetConfig
from gkd_core.data import prepare_dataset, save_prepared
from gkd_core.export import export_onnx
from gkd_core.modelfile import ModelFileError, meta_from_onnx_props, onnx_metadata, read_model, save_model
from gkd_core.models import build_model
from gkd_core.predict import OnnxPredictor, TorchPredictor, classify, open_model
from gkd_core.runner import evaluate_model, normalise_images
from gkd_core.sections import ModelConfig

runner = CliRunner()
N_IMAGES = 24


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digits prepared data, a (random, seeded) digits_cnn model file, its ONNX export with metadata, and the
    first test images as PNGs in a class tree, a .tar.gz and a .tar.xz of that tree."""
    root = tmp_path_factory.mktemp("predict")
    data = prepare_dataset(DatasetConfig(name="digits"), seed=0)
    save_prepared(data, root / "prepared.pt")
    torch.manual_seed(0)
    net = build_model("digits_cnn", num_classes=data.num_classes, in_channels=data.in_channels, width=0.5).eval()
    save_model(net, ModelConfig(name="digits_cnn", width=0.5), data, root / "model.pt")
    model, meta = read_model(root / "model.pt")
    x = normalise_images(data.test_x[:8], data.mean.tolist(), data.std.tolist())
    report = export_onnx(model, root / "model.onnx", x, metadata=onnx_metadata(meta))
    assert report.passed
    export_onnx(model, root / "bare.onnx", x)  # an ONNX file without gkd metadata
    tree = root / "images"
    members = {}
    for i, (img, y) in enumerate(zip(data.test_x[:N_IMAGES].numpy(), data.test_y[:N_IMAGES].tolist())):
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, format="PNG")
        members[f"test/{y}/{i:03d}.png"] = buf.getvalue()
    for name, blob in members.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(blob)
    (tree / "test" / ".hidden.png").write_bytes(b"not an image, and hidden: skipped like the dataset does")
    (tree / "notes.txt").write_text("not an image extension: skipped")
    for suffix, mode in ((".tar.gz", "w:gz"), (".tar.xz", "w:xz")):
        with tarfile.open(root / f"images{suffix}", mode) as tf:
            for name, blob in members.items():
                info = tarfile.TarInfo(f"images/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    expected = classify(model, meta, data.test_x[:N_IMAGES]).argmax(1).tolist()
    return {"root": root, "data": data, "model": model, "meta": meta, "members": members,
            "expected": [str(meta.classes[i]) for i in expected]}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _invoke(*args: str):
    return runner.invoke(app, ["predict", *args])


def _labels_by_image(rows: list[dict], key: str = "path") -> list[str]:
    """Labels in the order of the images' numbers (the file name 000.png ...)."""
    return [r["label"] for r in sorted(rows, key=lambda r: Path(str(r[key]).split(":")[-1]).stem)]


@pytest.mark.parametrize("source", ["images", "images.tar.gz", "images.tar.xz"])
@pytest.mark.parametrize("model_file", ["model.pt", "model.onnx"])
def test_folder_and_archives_give_the_models_labels(project: dict, source: str, model_file: str,
                                                    tmp_path: Path) -> None:
    root = project["root"]
    out = tmp_path / "preds.csv"
    res = _invoke("--model", str(root / model_file), str(root / source), "--out", str(out), "--batch-size", "7")
    assert res.exit_code == 0, res.output
    rows = _csv(out)
    assert len(rows) == N_IMAGES  # the hidden file and the .txt are skipped, as the image_folder dataset does
    assert list(rows[0])[:3] == ["path", "label", "confidence"]
    assert list(rows[0])[3:] == [f"p_{c}" for c in project["meta"].classes]
    assert _labels_by_image(rows) == project["expected"]
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in project["meta"].classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert float(r["confidence"]) == pytest.approx(max(probs), abs=1e-5)
    if source.startswith("images.tar"):
        assert all(r["path"].startswith(f"{root / source}:images/test/") for r in rows)


def test_single_files_json_and_printed_output(project: dict, tmp_path: Path) -> None:
    root = project["root"]
    files = sorted((root / "images" / "test").rglob("0*.png"))[:3]
    out = tmp_path / "preds.json"
    res = _invoke("--model", str(root / "model.pt"), *map(str, files), "--out", str(out))
    assert res.exit_code == 0, res.output
    records = json.loads(out.read_text())
    assert [r["path"] for r in records] == [str(f) for f in files]
    assert set(records[0]) == {"path", "label", "confidence", "probabilities"}
    assert list(records[0]["probabilities"]) == list(project["meta"].classes)
    printed = _invoke("--model", str(root / "model.pt"), *map(str, files))
    assert printed.exit_code == 0, printed.output
    lines = [line.split("\t") for line in printed.stdout.splitlines() if "\t" in line]
    assert [(p, label) for p, label, _ in lines] == [(r["path"], r["label"]) for r in records]


def test_rgb_and_resized_inputs_use_the_models_preprocessing(project: dict, tmp_path: Path) -> None:
    """An RGB PNG of a grey image is converted to the model's one channel (same label); a larger image is
    resized to the model's input size."""
    root, data = project["root"], project["data"]
    img = data.test_x[0, 0].numpy()
    Image.fromarray(np.stack([img] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(img).resize((32, 32)).save(tmp_path / "big.png")
    out = tmp_path / "p.csv"
    res = _invoke("--model", str(root / "model.pt"), str(tmp_path / "rgb.png"), str(tmp_path / "big.png"),
                  "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = _csv(out)
    assert rows[0]["label"] == project["expected"][0]
    assert len(rows) == 2


def test_prepared_split_accuracy_is_evaluate_models(project: dict, tmp_path: Path) -> None:
    root, data = project["root"], project["data"]
    out = tmp_path / "split.csv"
    res = _invoke("--model", str(root / "model.pt"), "--split", "test", "--data", str(root / "prepared.pt"),
                  "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = _csv(out)
    assert [int(r["index"]) for r in rows] == list(range(len(data.test_y)))
    classes = list(project["meta"].classes)
    accuracy = np.mean([classes.index(r["label"]) == y for r, y in zip(rows, data.test_y.tolist())])
    assert accuracy == pytest.approx(evaluate_model(project["model"], data, "test", device="cpu")["accuracy"])
    assert f"accuracy {accuracy:.4f}" in res.output
    onnx_out = tmp_path / "split_onnx.csv"
    res = _invoke("--model", str(root / "model.onnx"), "--split", "test", "--data", str(root / "prepared.pt"),
                  "--out", str(onnx_out))
    assert res.exit_code == 0, res.output
    assert [r["label"] for r in _csv(onnx_out)] == [r["label"] for r in rows]


def test_onnx_file_carries_the_model_metadata(project: dict) -> None:
    meta = project["meta"]
    props = onnx_metadata(meta)
    assert props["gkd.model"] == "digits_cnn" and json.loads(props["gkd.classes"]) == list(meta.classes)
    assert meta_from_onnx_props(props) == meta.model_copy(update={"extra": {}})
    onnx_model = OnnxPredictor(project["root"] / "model.onnx")
    assert onnx_model.meta.classes == meta.classes and onnx_model.meta.mean == pytest.approx(meta.mean)
    assert onnx_model.meta.input_hw == meta.input_hw and onnx_model.meta.in_channels == meta.in_channels
    x = project["data"].test_x[:16]
    torch_probs = TorchPredictor(project["model"], meta).probabilities(x)
    assert torch.allclose(onnx_model.probabilities(x), torch_probs, atol=1e-5)
    with pytest.raises(ModelFileError, match="no gkd metadata"):
        open_model(project["root"] / "bare.onnx")


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{root}/model.pt", "{root}/nowhere"], "no such file or folder"),
    (["--model", "{root}/nothing.pt", "{root}/images"], "model file not found"),
    (["--model", "{root}/bare.onnx", "{root}/images"], "no gkd metadata"),
    (["--model", "{root}/model.pt", "{root}/bad.png"], "cannot decode image"),
    (["--model", "{root}/model.pt", "{root}/images", "--out", "{root}/p.txt"], "must end in .csv or .json"),
    (["--model", "{root}/model.pt", "{root}/images", "--split", "test"], "not both"),
    (["--model", "{root}/model.pt"], "nothing to predict"),
    (["--model", "{root}/model.pt", "--split", "test", "--data", "{root}/none.pt"], "not found"),
    (["--model", "{root}/model.pt", "--split", "holdout", "--data", "{root}/prepared.pt"], "train, val or test"),
    (["--model", "models:/gkd-student@champion", "{root}/images"], "MLflow model URIs need"),
    (["--model", "{root}/model.pt", "{root}/corrupt.tar.gz"], "corrupt or truncated archive"),
])
def test_user_errors_one_message_exit_2(project: dict, args: list[str], message: str) -> None:
    root = project["root"]
    (root / "bad.png").write_bytes(b"\x89PNG but truncated")
    (root / "corrupt.tar.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    res = _invoke(*[a.format(root=root) for a in args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (root / "p.txt").exists()


def test_the_installed_gkd_is_the_tasks_app_with_every_command() -> None:
    """pyproject's `gkd` script is tasks/gkd.py's app: gkd_core.cli's commands, predict taking model URIs."""
    import tomllib

    import gkd_core.cli
    import tasks.gkd
    from tasks.code_deps import ROOT

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gkd"] == "tasks.gkd:app"

    def names(typer_app) -> list[str]:
        return [c.name for c in typer_app.registered_commands]

    assert names(tasks.gkd.app) == names(gkd_core.cli.app) == [*gkd_core.cli.COMMANDS, "predict"]
    assert tasks.gkd.is_model_uri("models:/gkd-student@champion") and not tasks.gkd.is_model_uri("models/s.pt")
    import typer

    def model_help(typer_app) -> str:
        predict = typer.main.get_command(typer_app).commands["predict"]
        return next(p.help for p in predict.params if p.name == "model")

    assert "models:/gkd-student@champion" in model_help(tasks.gkd.app)
    assert "models:/" not in model_help(gkd_core.cli.app)
    assert runner.invoke(tasks.gkd.app, ["predict", "--help"]).exit_code == 0
