"""Predictions from a trained model on raw images: the model's own preprocessing, batched.

What a model file says about its input (:class:`~gkd_core.modelfile.ModelMeta`: channels, size, mean/std,
classes) is all the preprocessing needs, so a model predicts on images the way it was trained:

* an image is encoded bytes (PNG, JPEG, ... decoded with PIL), a path to such a file, or a uint8 array
  (``H x W``, ``H x W x C`` or ``C x H x W``); base64 text of encoded bytes is accepted too (JSON clients);
* it is converted to the model's channels (L or RGB), resized (bilinear, as ``dataset.image_size`` does) when
  its size differs from the model's, and normalised with the training statistics.

:func:`classify` returns class probabilities; :func:`predictions_table` the rows users read (label,
confidence, probabilities). Used by ``gkd predict`` and by the registered MLflow model (tasks/serving_model.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from gkd_core.data import Normalizer
from gkd_core.modelfile import ModelMeta

__all__ = ["ImageInputError", "Prediction", "to_uint8_chw", "images_to_batch", "classify", "predictions_table"]

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
