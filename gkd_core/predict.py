"""Predictions from a trained model on raw images: the model's own preprocessing, batched.

What a model file says about its input (:class:`~gkd_core.modelfile.ModelMeta`: channels, size, mean/std,
classes) is all the preprocessing needs, so a model predicts on images the way it was trained:

* an image is encoded bytes (PNG, JPEG, ... decoded with PIL), a uint8 array (``H x W``, ``H x W x C`` or
  ``C x H x W``) or base64 text of encoded bytes (JSON clients); a :class:`~pathlib.Path` to an image file
  only where the caller allows files (``gkd predict``; the served model never does). A string is never
  taken as a path: a request could otherwise read, or probe for, files on the server;
* every input is checked against :class:`~gkd_core.limits.InputLimits` before it is decoded (bytes per
  image, pixels from the header, images per request);
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
import json
import logging
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

from gkd_core.data import (DatasetError, Normalizer, PreparedData, Refused, is_archive, iter_images, open_image,
                           read_image_file)
from gkd_core.engine import resolve_device
from gkd_core.io import atomic_write
from gkd_core.limits import InputLimits, LimitError, limits
from gkd_core.modelfile import ModelFileError, ModelMeta, meta_from_onnx_props, read_model

__all__ = ["ImageInputError", "Prediction", "to_uint8_chw", "images_to_batch", "classify", "predictions_table",
           "Predictor", "TorchPredictor", "OnnxPredictor", "open_model", "image_sources", "split_batches",
           "image_batches", "predict_batches", "PredictionRow", "PredictionWriter", "OUTPUT_FORMATS"]

log = logging.getLogger(__name__)

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


# The one answer to a value that is not an image, whether it is not base64 or base64 of something PIL cannot
# read: a request learns nothing from it but that (and never anything about files on the server).
NOT_AN_IMAGE = "cannot decode image: expected PNG, JPEG or another format PIL reads, as bytes or base64 text"


def _decode(data: bytes, channels: int, hw: tuple[int, int], name: str, lim: InputLimits,
            reason: Optional[str] = None) -> np.ndarray:
    """``reason``: what to say when the bytes do not decode (default: the decoder's error type)."""
    lim.check_file_bytes(len(data), name)
    try:
        with open_image(data, lim, name) as im:
            im.load()
            return _to_model_input(im, channels, hw)
    except LimitError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is an unreadable image
        # never PIL's text: it carries object addresses
        raise ImageInputError(f"{name}: {reason or f'cannot decode image ({type(err).__name__})'}") from None


def _from_array(arr: np.ndarray, channels: int, hw: tuple[int, int], name: str, lim: InputLimits) -> np.ndarray:
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
    lim.check_pixels(chw.shape[2], chw.shape[1], name)
    if chw.shape[0] == channels and tuple(chw.shape[1:]) == hw:
        return np.ascontiguousarray(chw)
    mode, hwc = ("L", chw[0]) if chw.shape[0] == 1 else ("RGB", chw.transpose(1, 2, 0))
    return _to_model_input(Image.fromarray(np.ascontiguousarray(hwc), mode), channels, hw)


def _as_array(item: Sequence[Any], name: str) -> np.ndarray:
    try:
        arr = np.asarray(item)
    except (ValueError, TypeError):  # ragged nesting
        raise ImageInputError(f"{name}: pixels are not a rectangular array (rows of different lengths)") from None
    if arr.dtype == object:
        raise ImageInputError(f"{name}: pixels are not a rectangular array of integers")
    return arr


def to_uint8_chw(item: Any, meta: ModelMeta, name: str = "image", allow_files: bool = True,
                 lim: Optional[InputLimits] = None) -> np.ndarray:
    """One input as the model's uint8 ``C x H x W`` image (see the module docstring); raises
    :class:`ImageInputError` with one line. ``allow_files``: whether a :class:`~pathlib.Path` is read."""
    lim = lim or limits()
    channels, hw = meta.in_channels, meta.input_hw
    try:
        if isinstance(item, Refused):
            raise ImageInputError(item.reason)
        if isinstance(item, (bytes, bytearray)):
            return _decode(bytes(item), channels, hw, name, lim, NOT_AN_IMAGE)
        if isinstance(item, np.ndarray):
            return _from_array(item, channels, hw, name, lim)
        if isinstance(item, str):
            lim.check_file_bytes(len(item) * 3 // 4, name)  # base64 is 4/3 of the bytes: refuse before decoding
            try:
                data = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise ImageInputError(f"{name}: {NOT_AN_IMAGE}") from None
            return _decode(data, channels, hw, name, lim, NOT_AN_IMAGE)
        if isinstance(item, os.PathLike):
            if not allow_files:
                raise ImageInputError(f"{name}: file paths are not accepted here; send the image's bytes")
            path = Path(item)
            try:
                data = read_image_file(path, lim)
            except OSError as err:
                raise ImageInputError(f"{path}: cannot read ({err.strerror or err})") from None
            return _decode(data, channels, hw, str(path), lim)
        if isinstance(item, (list, tuple)):
            return _from_array(_as_array(item, name), channels, hw, name, lim)
    except LimitError as err:
        raise ImageInputError(str(err)) from None
    raise ImageInputError(f"{name}: cannot use a {type(item).__name__} as an image")


def images_to_batch(items: Iterable[Any], meta: ModelMeta, allow_files: bool = True) -> torch.Tensor:
    """Inputs -> one uint8 ``N x C x H x W`` tensor in the model's input format (at most
    ``request_rows`` of them when files are not allowed, i.e. for a request to the served model)."""
    lim = limits()
    items = list(items)
    if not allow_files:
        try:
            lim.check_rows(len(items))
        except LimitError as err:
            raise ImageInputError(str(err)) from None
    arrays = [to_uint8_chw(item, meta, f"input {i}", allow_files, lim) for i, item in enumerate(items)]
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
            limits().check_model_bytes(Path(path).stat().st_size, str(path))
            self.session = load_onnx_session(path)
        except (LimitError, ExportError) as err:
            raise ModelFileError(str(err)) from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta = meta_from_onnx_props(props, str(path))
        self.source = source or str(path)
        self._input = _check_onnx_graph(self.session, self.meta, str(path))
        self._normalise = Normalizer(self.meta.mean, self.meta.std, self.meta.in_channels, torch.device("cpu"))

    def probabilities(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = self._normalise(x_uint8.cpu()).numpy().astype(np.float32, copy=False)
        logits = self.session.run(None, {self._input: np.ascontiguousarray(x)})[0]
        return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1)


def _check_onnx_graph(session: Any, meta: ModelMeta, where: str) -> str:
    """The graph must take what its metadata says (one float input ``N x C x H x W``) and give one score per
    class: metadata that disagrees with the graph would feed it wrongly shaped or normalised images, or
    label its outputs with the wrong classes. Returns the input's name; raises ModelFileError (one line)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise ModelFileError(f"{where}: the graph has {len(inputs)} inputs and {len(outputs)} outputs; a gkd "
                             "classifier has one image input and a logits output")
    h, w = meta.input_hw
    want_in = [None, meta.in_channels, h, w]
    got_in = list(inputs[0].shape)
    got_out = list(outputs[0].shape)
    fixed = lambda got, want: len(got) == len(want) and all(  # noqa: E731 - symbolic dims (batch) match anything
        x is None or not isinstance(g, int) or g == x for g, x in zip(got, want))
    if not fixed(got_in, want_in):
        raise ModelFileError(f"{where}: the graph's input is {got_in}, its metadata says N x {meta.in_channels} x "
                             f"{h} x {w}: export it again (dvc repro export_onnx)")
    if not fixed(got_out, [None, meta.num_classes]):
        raise ModelFileError(f"{where}: the graph's output is {got_out}, its metadata lists {meta.num_classes} "
                             "classes: export it again (dvc repro export_onnx)")
    return inputs[0].name


def open_model(path: str | os.PathLike, device: str = "cpu", source: Optional[str] = None) -> Predictor:
    """A local model: ``.onnx`` -> :class:`OnnxPredictor`, anything else a gkd model file
    (:class:`TorchPredictor`). Raises :class:`~gkd_core.modelfile.ModelFileError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, source)
    return TorchPredictor.from_file(path, device, source)


ImageSource = tuple[str, Union[bytes, Path, Refused]]  # (the name shown in the output, what to decode)


def image_sources(inputs: Sequence[str | os.PathLike], keep_going: bool = False) -> Iterator[ImageSource]:
    """Every image of ``inputs`` in order: an image file itself; a folder's or a tar archive's images under
    the image_folder dataset's rules (:func:`gkd_core.data.iter_images`). A folder's image is named by its
    path, an archive member ``<archive>:<member path>``. An input that cannot be listed (missing, not a
    regular file, a corrupt archive) raises :class:`ImageInputError` (one line), or with ``keep_going`` comes
    as a :class:`~gkd_core.data.Refused` entry and the listing goes on."""
    for item in inputs:
        path = Path(item)
        try:
            if not path.exists():
                raise ImageInputError(f"{path}: no such file or folder")
            if path.is_file() and not is_archive(path):
                yield str(path), path
                continue
            if not path.is_dir() and not path.is_file():
                raise ImageInputError(f"{path}: not a regular file or folder")
            for parts, data in iter_images(path, keep_going):
                name = f"{path}:{'/'.join(parts)}" if not isinstance(data, Path) else str(data)
                yield name, data
        except (ImageInputError, DatasetError) as err:
            if not keep_going:
                raise ImageInputError(str(err)) from None
            yield str(path), Refused(str(err))


def image_batches(sources: Iterable[ImageSource], meta: ModelMeta, batch_size: int,
                  unreadable: Optional[list[tuple[str, str]]] = None) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(names, uint8 batch in the model's input format)`` of at most ``batch_size`` images each. An image
    that cannot be read raises :class:`ImageInputError`, or, given an ``unreadable`` list, is appended to it
    as ``(name, reason)``, logged, and left out."""
    lim = limits()
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for name, data in sources:
        try:
            arrays.append(to_uint8_chw(data, meta, name, True, lim))
        except ImageInputError as err:
            if unreadable is None:
                raise
            unreadable.append((name, str(err)))
            log.warning("skipped: %s", err)
            continue
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
                   stream: Optional[TextIO] = None, strict: bool = False) -> dict[str, Any]:
    """``gkd predict``'s body: predict on ``inputs`` (files, folders, archives) or on ``split`` of ``data``,
    write or print the rows; returns ``{"rows", "out", "unreadable", "accuracy" (split only)}``. An input that
    cannot be read is reported and left out (``unreadable``: ``(name, reason)`` pairs), or with ``strict``
    ends the run; when no input at all could be read it is an error."""
    meta = predictor.meta
    unreadable: list[tuple[str, str]] = []
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
        batches = image_batches(image_sources(inputs, keep_going=not strict), meta, batch_size,
                                None if strict else unreadable)
        total = None if any(Path(p).is_dir() or is_archive(p) for p in inputs) else len(inputs)
    rows = writer.write(predict_batches(predictor, batches, total, progress), targets)
    if unreadable and not rows:
        if out is not None:
            Path(out).unlink(missing_ok=True)  # no output for a run that predicted nothing
        raise ImageInputError(f"none of the inputs could be read ({len(unreadable)} refused; the first: "
                              f"{unreadable[0][1]})")
    result: dict[str, Any] = {"rows": rows, "out": str(out) if out is not None else None,
                              "unreadable": unreadable}
    if targets is not None and rows:
        result["accuracy"] = writer.correct / rows
    return result
