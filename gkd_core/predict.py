"""Predictions from a trained model on raw images: the model's own preprocessing, batched.

What a model file says about its input (:class:`~gkd_core.modelfile.ModelMeta`: channels, size, mean/std,
classes) is all the preprocessing needs, so a model predicts on images the way it was trained:

* an image is encoded bytes (PNG, JPEG, ... decoded with PIL), a path to such a file, or a uint8 array
  (``H x W``, ``H x W x C`` or ``C x H x W``); base64 text of encoded bytes is accepted too (JSON clients);
* it is converted to the model's channels (L or RGB), resized (bilinear, as ``dataset.image_size`` does) when
  its size differs from the model's, and normalised with the training statistics.

:func:`classify` returns class probabilities; :func:`predictions_table` the rows users read (label,
confidence, probabilities). Used by ``gkd predict`` and by the registered MLflow model (tasks/serving_model.py).

``gkd predict``'s core is here too (no MLflow: the ``models:/`` URIs are resolved in tasks/gkd.py):

* a model to predict with (:class:`Predictor`): a gkd model file (:class:`TorchPredictor`) or an exported ONNX
  file run with onnxruntime (:class:`OnnxPredictor`, its metadata read from the file's ``metadata_props``);
  :func:`open_model` picks by the file's suffix;
* what to predict on: image files, folders and tar archives (:func:`image_sources`, the image_folder
  dataset's reading rules), or a split of a prepared dataset (:func:`split_batches`);
* :func:`predict_batches` runs them in batches (with a progress bar on a terminal) and
  :class:`PredictionWriter` writes the rows as CSV (``path``/``index``, ``label``, ``confidence``, one
  ``p_<class>`` column per class) or JSON, or prints them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, TextIO, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from gkd_core.data import DatasetError, Normalizer, PreparedData, is_archive, iter_images
from gkd_core.engine import resolve_device
from gkd_core.io import atomic_write
from gkd_core.modelfile import ModelFileError, ModelMeta, meta_from_onnx_props, read_model

__all__ = ["ImageInputError", "Prediction", "to_uint8_chw", "images_to_batch", "classify", "predictions_table",
           "Predictor", "TorchPredictor", "OnnxPredictor", "open_model", "image_sources", "split_batches",
           "image_batches", "predict_batches", "PredictionRow", "PredictionWriter", "OUTPUT_FORMATS"]

ImageLike = Union[bytes, bytearray, str, os.PathLike, np.ndarray, Sequence[Any]]


class ImageInputError(ValueError):
    """An input that is not an image the model can take; one line naming which input and why."""


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    confidence: float
    probabilities: list[float]


def _to_model_input(im: Image.Image, channels: int, hw: tuple[int, int]) -> np.ndarray:
    """A PIL image in the model's colour mode (L or RGB) and size (bilinear), as uint8 C x H x W."""
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (hw[1], hw[0]):
        im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode(data: bytes, channels: int, hw: tuple[int, int], name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _to_model_input(im, channels, hw)
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable image
        raise ImageInputError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def _from_array(arr: np.ndarray, channels: int, hw: tuple[int, int], name: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
            raise ImageInputError(f"{name}: expected uint8 pixel values 0..255, got a {arr.dtype} array")
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        chw = arr[None]
    elif arr.ndim == 3 and arr.shape[2] in (1, 3):
        chw = arr.transpose(2, 0, 1)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3):
        chw = arr
    else:
        raise ImageInputError(f"{name}: expected an image array H x W, H x W x C or C x H x W (C = 1 or 3), got "
                              f"shape {tuple(arr.shape)}")
    if chw.shape[0] == channels and tuple(chw.shape[1:]) == hw:
        return np.ascontiguousarray(chw)
    mode, hwc = ("L", chw[0]) if chw.shape[0] == 1 else ("RGB", chw.transpose(1, 2, 0))
    return _to_model_input(Image.fromarray(np.ascontiguousarray(hwc), mode), channels, hw)


def to_uint8_chw(item: ImageLike, meta: ModelMeta, name: str = "image") -> np.ndarray:
    """One input as the model's uint8 ``C x H x W`` image (see the module docstring)."""
    channels, hw = meta.in_channels, meta.input_hw
    if isinstance(item, (bytes, bytearray)):
        return _decode(bytes(item), channels, hw, name)
    if isinstance(item, np.ndarray):
        return _from_array(item, channels, hw, name)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if isinstance(item, os.PathLike) or (len(str(item)) < 4096 and path.is_file()):
            if not path.is_file():
                raise ImageInputError(f"{path}: image file not found")
            return _decode(path.read_bytes(), channels, hw, str(path))
        try:
            return _decode(base64.b64decode(str(item), validate=True), channels, hw, name)
        except (binascii.Error, ValueError):
            raise ImageInputError(f"{name}: neither an existing file nor base64-encoded image bytes") from None
    if isinstance(item, (list, tuple)):
        return _from_array(np.asarray(item), channels, hw, name)
    raise ImageInputError(f"{name}: cannot use a {type(item).__name__} as an image")


def images_to_batch(items: Iterable[ImageLike], meta: ModelMeta) -> torch.Tensor:
    """Inputs -> one uint8 ``N x C x H x W`` tensor in the model's input format."""
    arrays = [to_uint8_chw(item, meta, f"input {i}") for i, item in enumerate(items)]
    if not arrays:
        raise ImageInputError("no images given")
    return torch.from_numpy(np.stack(arrays))


@torch.inference_mode()
def classify(model: nn.Module, meta: ModelMeta, x_uint8: torch.Tensor, batch_size: int = 256,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Class probabilities ``(N, classes)`` (float32, CPU) of uint8 images in the model's input format."""
    device = torch.device(device)
    normalise = Normalizer(meta.mean, meta.std, meta.in_channels, device)
    model = model.to(device).eval()
    out = [torch.softmax(model(normalise(x_uint8[i:i + batch_size].to(device))).float(), dim=1).cpu()
           for i in range(0, x_uint8.shape[0], batch_size)]
    return torch.cat(out)


def predictions_table(probs: torch.Tensor, classes: Sequence[str]) -> Iterator[Prediction]:
    conf, idx = probs.max(dim=1)
    for p, c, i in zip(probs.tolist(), conf.tolist(), idx.tolist()):
        yield Prediction(label=str(classes[i]), index=int(i), confidence=float(c), probabilities=p)


# --- gkd predict: models, inputs, batches, output ------------------------------------------------------------


class Predictor(Protocol):
    """A model that takes uint8 images in its input format and returns class probabilities."""

    meta: ModelMeta
    source: str

    def probabilities(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """``(N, classes)`` float32 probabilities of ``N x C x H x W`` uint8 images."""
        ...


class TorchPredictor:
    """A gkd model file's network (:func:`gkd_core.modelfile.read_model`: never runs code from the file)."""

    def __init__(self, model: nn.Module, meta: ModelMeta, source: str = "model", device: str = "cpu"):
        self.model, self.meta, self.source = model, meta, source
        try:
            self.device = resolve_device(device)
        except (RuntimeError, ValueError) as err:
            raise ImageInputError(f"--device {device}: {err}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str = "cpu", source: Optional[str] = None) -> "TorchPredictor":
        model, meta = read_model(path)
        return cls(model, meta, source or str(path), device)

    def probabilities(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return classify(self.model, self.meta, x_uint8, batch_size=max(1, len(x_uint8)), device=self.device)


class OnnxPredictor:
    """An exported ONNX file run with onnxruntime (CPU); its input format and classes come from the file's
    ``metadata_props`` (written by the export stage, :func:`gkd_core.modelfile.onnx_metadata`)."""

    def __init__(self, path: str | os.PathLike, source: Optional[str] = None):
        from gkd_core.export import ExportError, load_onnx_session

        try:
            self.session = load_onnx_session(path)
        except ExportError as err:
            raise ModelFileError(str(err)) from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta = meta_from_onnx_props(props, str(path))
        self.source = source or str(path)
        self._input = self.session.get_inputs()[0].name
        self._normalise = Normalizer(self.meta.mean, self.meta.std, self.meta.in_channels, torch.device("cpu"))

    def probabilities(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = self._normalise(x_uint8.cpu()).numpy().astype(np.float32, copy=False)
        logits = self.session.run(None, {self._input: np.ascontiguousarray(x)})[0]
        return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1)


def open_model(path: str | os.PathLike, device: str = "cpu", source: Optional[str] = None) -> Predictor:
    """A local model: ``.onnx`` -> :class:`OnnxPredictor`, anything else a gkd model file
    (:class:`TorchPredictor`). Raises :class:`~gkd_core.modelfile.ModelFileError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, source)
    return TorchPredictor.from_file(path, device, source)


ImageSource = tuple[str, Union[bytes, Path]]  # (the name shown in the output, file path or encoded bytes)


def image_sources(inputs: Sequence[str | os.PathLike]) -> Iterator[ImageSource]:
    """Every image of ``inputs`` in order: an image file itself; a folder's or a tar archive's images under
    the image_folder dataset's rules (:func:`gkd_core.data.iter_images`). A folder's image is named by its
    path, an archive member ``<archive>:<member path>``. Raises :class:`ImageInputError` (one line)."""
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ImageInputError(f"{path}: no such file or folder")
        if path.is_file() and not is_archive(path):
            yield str(path), path
            continue
        try:
            for parts, data in iter_images(path):
                name = f"{path}:{'/'.join(parts)}" if isinstance(data, bytes) else str(data)
                yield name, data
        except DatasetError as err:
            raise ImageInputError(str(err)) from None


def image_batches(sources: Iterable[ImageSource], meta: ModelMeta, batch_size: int
                  ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(names, uint8 batch in the model's input format)`` of at most ``batch_size`` images each."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for name, data in sources:
        arrays.append(to_uint8_chw(data, meta, name))
        names.append(name)
        if len(arrays) == batch_size:
            yield names, torch.from_numpy(np.stack(arrays))
            names, arrays = [], []
    if arrays:
        yield names, torch.from_numpy(np.stack(arrays))


def split_batches(data: PreparedData, split: str, meta: ModelMeta, batch_size: int
                  ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(row numbers, uint8 batch)`` of a prepared split; the model must take the data's images as they are
    (same channels and size: raises :class:`ImageInputError` otherwise)."""
    if split not in ("train", "val", "test"):
        raise ImageInputError(f"--split must be train, val or test, got {split!r}")
    x = getattr(data, f"{split}_x")
    if (data.in_channels, *data.image_hw) != (meta.in_channels, *meta.input_hw):
        raise ImageInputError(
            f"the model takes {meta.in_channels}x{meta.input_hw[0]}x{meta.input_hw[1]} images, the prepared data "
            f"has {data.in_channels}x{data.image_hw[0]}x{data.image_hw[1]}: a model trained on another dataset?")
    for start in range(0, x.shape[0], batch_size):
        yield list(range(start, min(start + batch_size, x.shape[0]))), x[start:start + batch_size]


@dataclass(frozen=True)
class PredictionRow:
    key: Union[str, int]  # the image's name (path) or its row number in a prepared split
    label: str
    index: int
    confidence: float
    probabilities: list[float]


def predict_batches(predictor: Predictor, batches: Iterable[tuple[Sequence[Any], torch.Tensor]],
                    total: Optional[int] = None, progress: Optional[bool] = None,
                    desc: str = "predicting") -> Iterator[PredictionRow]:
    """Rows of every batch, in order; a tqdm bar (images) on stderr when ``progress`` (``None``: when stderr is
    a terminal)."""
    classes = predictor.meta.classes
    with tqdm(total=total, desc=desc, unit="img", disable=None if progress is None else not progress,
              leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        for keys, x in batches:
            probs = predictor.probabilities(x)
            for key, pred in zip(keys, predictions_table(probs, classes)):
                yield PredictionRow(key, pred.label, pred.index, pred.confidence, pred.probabilities)
            bar.update(len(keys))


OUTPUT_FORMATS = (".csv", ".json")


class PredictionWriter:
    """Rows to ``out`` (``.csv`` or ``.json``, written atomically) or, without ``out``, printed to ``stream``
    as ``<path or index>  <label>  <confidence>`` lines. CSV columns: ``path`` (or ``index``), ``label``,
    ``confidence``, then ``p_<class>`` per class; JSON: a list of ``{path|index, label, confidence,
    probabilities: {class: p}}``."""

    def __init__(self, classes: Sequence[str], key: str = "path", out: Optional[str | os.PathLike] = None,
                 stream: Optional[TextIO] = None):
        self.classes, self.key = [str(c) for c in classes], key
        self.out = Path(out) if out is not None else None
        if self.out is not None and self.out.suffix.lower() not in OUTPUT_FORMATS:
            raise ImageInputError(f"--out {self.out}: write .csv or .json")
        self.stream = stream or sys.stdout
        self.rows = 0
        self.correct = 0

    def write(self, rows: Iterable[PredictionRow], targets: Optional[Sequence[int]] = None) -> int:
        """Write every row (and count those whose class index equals ``targets[key]``); returns the count."""
        counted = self._count(rows, targets)
        if self.out is None:
            for row in counted:
                self.stream.write(f"{row.key}\t{row.label}\t{row.confidence:.4f}\n")
        elif self.out.suffix.lower() == ".csv":
            with atomic_write(self.out, "w") as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow([self.key, "label", "confidence", *(f"p_{c}" for c in self.classes)])
                for row in counted:
                    writer.writerow([row.key, row.label, _num(row.confidence), *map(_num, row.probabilities)])
        else:
            records = [{self.key: row.key, "label": row.label, "confidence": row.confidence,
                        "probabilities": dict(zip(self.classes, row.probabilities))} for row in counted]
            with atomic_write(self.out) as fh:
                json.dump(records, fh, indent=1)
                fh.write("\n")
        return self.rows

    def _count(self, rows: Iterable[PredictionRow], targets: Optional[Sequence[int]]) -> Iterator[PredictionRow]:
        for row in rows:
            self.rows += 1
            if targets is not None and int(targets[int(row.key)]) == row.index:
                self.correct += 1
            yield row


def _num(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6g}"


def run_prediction(predictor: Predictor, inputs: Sequence[str | os.PathLike] = (), split: Optional[str] = None,
                   data: Optional[PreparedData] = None, out: Optional[str | os.PathLike] = None,
                   batch_size: int = 256, progress: Optional[bool] = None,
                   stream: Optional[TextIO] = None) -> dict[str, Any]:
    """``gkd predict``'s body: predict on ``inputs`` (files, folders, archives) or on ``split`` of ``data``,
    write or print the rows; returns ``{"rows", "out", "accuracy" (split only)}``."""
    meta = predictor.meta
    if batch_size < 1:
        raise ImageInputError(f"--batch-size must be at least 1, got {batch_size}")
    if split is not None:
        if data is None:
            raise ImageInputError("--split needs the prepared dataset (--data data/prepared.pt)")
        writer = PredictionWriter(meta.classes, "index", out, stream)
        if list(data.classes) != list(meta.classes):
            raise ImageInputError(f"the model's classes {list(meta.classes)[:4]}... differ from the prepared "
                                  f"data's {list(data.classes)[:4]}...: a model trained on another dataset?")
        targets = getattr(data, f"{split}_y").tolist() if split in ("train", "val", "test") else None
        batches: Iterable[tuple[Sequence[Any], torch.Tensor]] = split_batches(data, split, meta, batch_size)
        total: Optional[int] = len(targets) if targets is not None else None
    else:
        if not inputs:
            raise ImageInputError("nothing to predict: give image files, folders or archives, or --split")
        writer = PredictionWriter(meta.classes, "path", out, stream)
        targets = None
        batches = image_batches(image_sources(inputs), meta, batch_size)
        total = None if any(Path(p).is_dir() or is_archive(p) for p in inputs) else len(inputs)
    rows = writer.write(predict_batches(predictor, batches, total, progress), targets)
    result: dict[str, Any] = {"rows": rows, "out": str(out) if out is not None else None}
    if targets is not None and rows:
        result["accuracy"] = writer.correct / rows
    return result
