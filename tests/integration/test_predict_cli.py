"""`gkd predict` against the evaluate stage's numbers, run as the installed `gkd` command (pyproject's entry
point) in the pipeline project: the prepared test split from the model file and from the registered
``models:/`` URI gives reports/evaluate.json's accuracy exactly; the ONNX file agrees on the labels; a folder
and a .tar.gz of PNGs written from the test images give the same labels as the split."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from _project import console_script, run

pytestmark = pytest.mark.integration


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _accuracy(rows: list[dict[str, str]], targets: list[int], classes: list[str]) -> float:
    return sum(classes.index(r["label"]) == targets[int(r["index"])] for r in rows) / len(rows)


def test_predict_reproduces_the_evaluate_stage(pipeline_run: dict[str, Any], pipeline_project: Path,
                                               tmp_path: Path) -> None:
    from gkd_core.data import load_prepared

    root = pipeline_project
    gkd = str(console_script("gkd", tmp_path / "bin"))
    data = load_prepared(root / "data" / "prepared.pt")
    targets, classes = data.test_y.tolist(), list(data.classes)
    evaluation = json.loads((root / "reports" / "evaluate.json").read_text())

    outputs = {}
    for name, model in (("pt", "models/student.pt"), ("uri", "models:/gkd-student@challenger"),
                        ("onnx", "models/student.onnx")):
        out = tmp_path / f"{name}.csv"
        proc = run([gkd, "predict", "--model", model, "--split", "test", "--data", "data/prepared.pt",
                    "--out", str(out)], root)
        assert f"accuracy {_accuracy(_rows(out), targets, classes):.4f}" in proc.stderr, proc.stderr
        outputs[name] = _rows(out)
    assert len(outputs["pt"]) == len(targets) == evaluation.get("n", len(targets))
    # evaluate.json holds the float32 mean the metrics computed; one test image is 1/n, far above 1e-6
    assert _accuracy(outputs["pt"], targets, classes) == pytest.approx(evaluation["test_accuracy"], abs=1e-6)
    assert _accuracy(outputs["uri"], targets, classes) == pytest.approx(evaluation["test_accuracy"], abs=1e-6)
    assert [r["label"] for r in outputs["uri"]] == [r["label"] for r in outputs["pt"]]
    agree = sum(a["label"] == b["label"] for a, b in zip(outputs["onnx"], outputs["pt"])) / len(targets)
    assert agree == 1.0, f"ONNX labels agree with the model file's on {agree:.4f} of the test split"

    # PNGs of the test images: a folder tree and a .tar.gz of it, read by the image_folder dataset's rules
    tree = tmp_path / "pngs"
    with tarfile.open(tmp_path / "pngs.tar.gz", "w:gz") as tf:
        for i, (img, y) in enumerate(zip(data.test_x.numpy(), targets)):
            buf = io.BytesIO()
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
            rel = f"test/{classes[y]}/{i:05d}.png"
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes(buf.getvalue())
            info = tarfile.TarInfo(f"pngs/{rel}")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    by_split = [r["label"] for r in outputs["pt"]]
    for source in (tree, tmp_path / "pngs.tar.gz"):
        out = tmp_path / f"{source.name}.json"
        run([gkd, "predict", "--model", "models/student.pt", str(source), "--out", str(out)], root)
        records = json.loads(out.read_text())
        assert len(records) == len(targets)
        by_number = sorted(records, key=lambda r: Path(r["path"].split(":")[-1]).stem)
        assert [r["label"] for r in by_number] == by_split, source
    printed = run([gkd, "predict", "--model", "models:/gkd-student@challenger",
                   *map(str, sorted(tree.rglob("*.png"))[:3])], root)
    lines = [line.split("\t") for line in printed.stdout.splitlines()]
    assert len(lines) == 3 and all(len(parts) == 3 and parts[1] in classes for parts in lines), printed.stdout
