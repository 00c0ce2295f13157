"""Model files and inputs from outside are checked before they allocate: a size cap, no compressed records,
metadata that agrees with itself, weights whose shapes fit the declared architecture (compared on the meta
device), ONNX metadata that agrees with the graph, limits read from the environment with one-line errors."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gkd_core.limits import ENV_VARS, InputLimits, LimitError
from gkd_core.modelfile import ModelFileError, read_model, save_model
from gkd_core.models import build_model
from gkd_core.predict import NOT_AN_IMAGE, ImageInputError, images_to_batch, to_uint8_chw
from gkd_core.sections import ModelConfig

CLASSES = [str(i) for i in range(10)]


def _data(**over):
    base = dict(num_classes=10, in_channels=1, image_size=8, image_hw=(8, 8), mean=[0.5], std=[0.25],
                classes=CLASSES, meta={"sha256": "ab" * 32})
    base.update(over)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("m") / "student.pt"
    save_model(build_model("digits_cnn", 10, 1, width=0.5), ModelConfig(name="digits_cnn", width=0.5), _data(), path)
    return path


def _rewrite(src: Path, dst: Path, **fields) -> Path:
    blob = torch.load(src, weights_only=True)
    blob.update(fields)
    torch.save(blob, dst)
    return dst


def test_a_good_file_reads(model_file: Path) -> None:
    model, meta = read_model(model_file)
    assert meta.classes == CLASSES and not model.training


@pytest.mark.parametrize(("fields", "expect"), [
    ({"classes": CLASSES[:9]}, "9 class names for num_classes = 10"),
    ({"classes": ["a"] * 10}, "class names repeat"),
    ({"mean": [0.5, 0.5, 0.5]}, "mean has 3 values for in_channels = 1"),
    ({"std": [float("nan")]}, "std holds a non-finite value"),
    ({"mean": [float("inf")]}, "mean holds a non-finite value"),
    ({"std": [0.0]}, "std must be > 0"),
    ({"image_hw": [0, 8]}, "image_hw [0, 8] outside 1..8192"),
    ({"num_classes": 0}, "num_classes"),
])
def test_inconsistent_metadata_is_one_line(model_file: Path, tmp_path: Path, fields: dict, expect: str) -> None:
    bad = _rewrite(model_file, tmp_path / "bad.pt", **fields)
    with pytest.raises(ModelFileError, match="invalid model metadata") as err:
        read_model(bad)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_a_compressed_record_is_refused_before_loading(model_file: Path, tmp_path: Path) -> None:
    """A deflated record inflates beyond the file's size (a 190 KB file holding a 190 MB tensor)."""
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ModelFileError, match="compressed record"):
        read_model(bomb)


def test_a_file_over_the_size_cap_is_refused(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VARS["model_bytes"], "1000")
    with pytest.raises(ModelFileError, match=r"over the limit of 1,000 \(GKD_MAX_MODEL_BYTES\)"):
        read_model(model_file)


def test_weights_of_another_shape_are_named(model_file: Path, tmp_path: Path) -> None:
    blob = torch.load(model_file, weights_only=True)
    state = dict(blob["state_dict"])
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = torch.zeros(3, 3)
    bad = _rewrite(model_file, tmp_path / "shape.pt", state_dict=state)
    with pytest.raises(ModelFileError, match=f"tensor\\(s\\) of another shape, e.g. '{name}' is \\[3, 3\\]"):
        read_model(bad)


def test_a_tiny_file_declaring_a_huge_network_is_refused_without_building_it(model_file: Path,
                                                                              tmp_path: Path) -> None:
    """~1 KB of metadata declaring mobilenetv2 x8 with 100,000 classes (~4.5 GB if built): refused, and the
    process's peak memory stays far below what building it would take."""
    bad = _rewrite(model_file, tmp_path / "huge.pt", model={"name": "mobilenetv2", "width": 8.0},
                   num_classes=100_000, classes=[f"c{i}" for i in range(100_000)], state_dict={})
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest
    # process would report the parent's peak
    code = textwrap.dedent(f"""
        from pathlib import Path
        from gkd_core.modelfile import ModelFileError, read_model
        try:
            read_model({str(bad)!r})
        except ModelFileError as err:
            print(str(err))
        print(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    message, peak_kb = out.stdout.strip().splitlines()
    assert "do not fit the architecture it declares (mobilenetv2 width 8" in message, message
    assert "missing" in message
    assert int(peak_kb) < 1_500_000, f"peak RSS {int(peak_kb) // 1024} MiB: the network was built"


def test_onnx_metadata_must_agree_with_the_graph(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from gkd_core.export import _set_metadata, export_onnx
    from gkd_core.modelfile import ModelMeta, onnx_metadata
    from gkd_core.predict import OnnxPredictor

    model = build_model("digits_cnn", 10, 1, width=0.5).eval()
    meta = ModelMeta(format="gkd-model/2", model=ModelConfig(name="digits_cnn", width=0.5), num_classes=10,
                     in_channels=1, image_size=8, image_hw=(8, 8), mean=[0.5], std=[0.25], classes=CLASSES)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, torch.randn(2, 1, 8, 8), metadata=onnx_metadata(meta))
    assert OnnxPredictor(path).meta.num_classes == 10
    lying = meta.model_copy(update={"in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3})
    _set_metadata(path, onnx_metadata(lying))
    with pytest.raises(ModelFileError, match=r"the graph's input is \[.*1, 8, 8\], its metadata says N x 3 x 8 x 8"):
        OnnxPredictor(path)
    lying = meta.model_copy(update={"num_classes": 12, "classes": [str(i) for i in range(12)]})
    _set_metadata(path, onnx_metadata(lying))
    with pytest.raises(ModelFileError, match=r"the graph's output is \[.*10\], its metadata lists 12 classes"):
        OnnxPredictor(path)


# --- limits and inputs ---------------------------------------------------------------------------------------


def test_limits_come_from_the_environment_with_one_line_errors() -> None:
    assert InputLimits.from_env({}) == InputLimits()
    assert InputLimits.from_env({"GKD_MAX_IMAGE_PIXELS": "1_000"}).image_pixels == 1000
    assert InputLimits.from_env({"GKD_MAX_IMAGE_PIXELS": "1000"}, image_pixels=5).image_pixels == 5
    for bad in ("0", "-3", "lots", "1e6"):
        with pytest.raises(LimitError, match=f"GKD_MAX_FILE_BYTES='{bad}': expected a positive integer"):
            InputLimits.from_env({"GKD_MAX_FILE_BYTES": bad})


def test_an_override_holds_inside_only_and_reaches_the_decoding_threads(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """gkd predict's --max-* flags: in force for its own calls, gone afterwards (no os.environ change, so a
    command run in-process leaves nothing behind), and handed to the image_folder decoder's thread pool."""
    from gkd_core.data import DatasetError, load_image_folder_raw
    from gkd_core.limits import limits, using_limits
    from gkd_core.sections import DatasetConfig

    monkeypatch.delenv(ENV_VARS["image_pixels"], raising=False)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "1.png").write_bytes(_png(20, 20))
    with using_limits(InputLimits(image_pixels=100)):
        assert limits().image_pixels == 100
        with pytest.raises(DatasetError, match="20x20 = 400 pixels, over the limit of 100"):
            load_image_folder_raw(DatasetConfig(name="image_folder", root=str(tmp_path)))
    assert limits() == InputLimits()
    assert len(load_image_folder_raw(DatasetConfig(name="image_folder", root=str(tmp_path))).train_y) > 0


def _meta():
    from gkd_core.modelfile import ModelMeta

    return ModelMeta(format="gkd-model/2", model=ModelConfig(name="digits_cnn", width=0.5), num_classes=10,
                     in_channels=1, image_size=8, image_hw=(8, 8), mean=[0.5], std=[0.25], classes=CLASSES)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VARS["image_pixels"], "10000")
    with pytest.raises(ImageInputError, match=r"input 0: image is 200x100 = 20,000 pixels, over the limit of 10,000"):
        images_to_batch([_png(200, 100)], _meta())
    assert images_to_batch([_png(100, 100)], _meta()).shape == (1, 1, 8, 8)
    with pytest.raises(ImageInputError, match="over the limit of 10,000"):
        to_uint8_chw(np.zeros((200, 100), np.uint8), _meta())


def test_strings_are_never_paths_and_files_only_where_allowed(tmp_path: Path) -> None:
    png = tmp_path / "real.png"
    png.write_bytes(_png(8, 8))
    answers = set()
    for value in (str(png), str(tmp_path / "missing.png"), "/etc/passwd", "/etc/shadow"):
        with pytest.raises(ImageInputError) as err:
            to_uint8_chw(value, _meta(), "input 0")
        answers.add(str(err.value))
    assert len(answers) == 1, answers
    with pytest.raises(ImageInputError) as err:  # base64 of bytes that are no image: the same answer
        to_uint8_chw(base64.b64encode(b"GIF89a...").decode(), _meta(), "input 0")
    assert answers == {str(err.value)} == {f"input 0: {NOT_AN_IMAGE}"}
    with pytest.raises(ImageInputError, match="file paths are not accepted here"):
        to_uint8_chw(png, _meta(), "input 0", allow_files=False)
    assert to_uint8_chw(png, _meta()).shape == (1, 8, 8)
    assert to_uint8_chw(base64.b64encode(_png(8, 8)).decode(), _meta()).shape == (1, 8, 8)


def test_ragged_pixels_rows_and_oversized_values_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageInputError, match="input 0: pixels are not a rectangular array"):
        images_to_batch([[[1, 2], [3]]], _meta())
    monkeypatch.setenv(ENV_VARS["request_rows"], "2")
    with pytest.raises(ImageInputError, match="3 images in one request, over the limit of 2"):
        images_to_batch([_png(8, 8)] * 3, _meta(), allow_files=False)
    monkeypatch.setenv(ENV_VARS["file_bytes"], "100")
    with pytest.raises(ImageInputError, match="over the limit of 100 bytes per image"):
        to_uint8_chw(base64.b64encode(b"x" * 300).decode(), _meta(), "input 0")


def test_a_fifo_in_a_folder_is_skipped_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import os

    from gkd_core.data import iter_images

    (tmp_path / "a.png").write_bytes(_png(8, 8))
    os.mkfifo(tmp_path / "x.png")
    with caplog.at_level(logging.WARNING):
        listed = [parts for parts, _ in iter_images(tmp_path)]
    assert listed == [("a.png",)]
    assert "skipped 1 entries that are not regular files" in caplog.text and "x.png" in caplog.text


def test_an_oversized_archive_member_is_refused_by_its_header(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import tarfile

    from gkd_core.data import DatasetError, Refused, iter_images

    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("ok.png", _png(8, 8)), ("big.png", b"\0" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv(ENV_VARS["file_bytes"], "1000")
    with pytest.raises(DatasetError, match="member big.png: 5,000 bytes, over the limit of 1,000 bytes per image"):
        list(iter_images(archive))
    got = list(iter_images(archive, keep_going=True))
    assert isinstance(got[0][1], bytes) and isinstance(got[1][1], Refused)
    monkeypatch.setenv(ENV_VARS["archive_members"], "1")
    with pytest.raises(DatasetError, match="more than 1 archive entries"):
        list(iter_images(archive, keep_going=True))

