"""Model files: weights plus what the model is, saved as plain data and loaded without running code.

A model file is one ``torch.save`` of a dict of tensors and plain Python values (no pickled classes):
the architecture (registry name, width), the input it takes (channels, height, width, normalisation), its
classes, the sha256 of the prepared data it was trained on, free-form ``extra`` facts (metrics) and the
``state_dict``. :func:`read_model` loads it with ``torch.load(weights_only=True)`` (through
:func:`gkd_core.io.safe_torch_load`), validates the metadata (it comes from a file someone else may have
written) and rebuilds the network; :func:`check_model` compares what the file says with what a run needs and
refuses a mismatch with one line naming the field, both values and the fix, before any compute.

The same metadata travels inside the exported ONNX file as ``metadata_props`` (:func:`onnx_metadata`, read
back by :func:`meta_from_onnx_props`), so an ``.onnx`` file alone is enough to feed raw images to the model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from gkd_core.io import UnsafeFileError, safe_torch_load, torch_save
from gkd_core.limits import LimitError, limits
from gkd_core.models import build_model
from gkd_core.sections import ModelConfig

__all__ = ["MODEL_FORMAT", "ModelFileError", "ModelMeta", "save_model", "read_model", "check_model",
           "ONNX_META_PREFIX", "onnx_metadata", "meta_from_onnx_props"]

MODEL_FORMAT = "gkd-model/2"
_READABLE = ("gkd-model/1", "gkd-model/2")  # /1 lacks data_hash and image_hw (checks that need them are skipped)


class ModelFileError(ValueError):
    """A model file is missing, unreadable, unsafe, inconsistent, or does not fit the run; one line."""


class ModelMeta(BaseModel):
    """What a model file says about its model (validated: the file may come from anywhere)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: str
    model: ModelConfig
    num_classes: int = Field(ge=1, le=100_000)
    in_channels: int = Field(ge=1, le=64)
    image_size: int = Field(ge=1, le=8192)
    image_hw: Optional[tuple[int, int]] = None
    mean: list[float]
    std: list[float]
    classes: list[str]
    data_hash: Optional[str] = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelMeta":
        """What the fields say must agree: one class name per class, one mean and std per channel, finite
        statistics and std > 0 (else predictions are silently NaN), an input size within bounds."""
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes = {self.num_classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("class names repeat")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.in_channels:
                raise ValueError(f"{name} has {len(values)} values for in_channels = {self.in_channels}")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} holds a non-finite value {values}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        if self.image_hw is not None and not all(1 <= v <= 8192 for v in self.image_hw):
            raise ValueError(f"image_hw {list(self.image_hw)} outside 1..8192")
        return self

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.image_hw or (self.image_size, self.image_size)

    def describe(self) -> str:
        h, w = self.input_hw
        data = f", data {self.data_hash[:12]}" if self.data_hash else ""
        return (f"{self.model.name} width {self.model.width:g}, input {self.in_channels}x{h}x{w}, "
                f"{self.num_classes} classes{data}")


def save_model(model: nn.Module, model_cfg: ModelConfig, data: Any, path: str | os.PathLike,
               extra: Optional[dict[str, Any]] = None) -> None:
    """Save ``model``'s weights with everything needed to rebuild, feed and check it (see the module
    docstring). ``data`` is the :class:`~gkd_core.data.PreparedData` it was trained on."""
    torch_save(
        {
            "format": MODEL_FORMAT,
            "model": model_cfg.model_dump(),
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": data.image_size,
            "image_hw": list(data.image_hw),
            "mean": [float(v) for v in data.mean],
            "std": [float(v) for v in data.std],
            "classes": list(data.classes),
            "data_hash": data.meta.get("sha256"),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": extra or {},
        },
        path,
    )


def read_model(path: str | os.PathLike) -> tuple[nn.Module, ModelMeta]:
    """Load a file written by :func:`save_model`: ``(model in eval mode on CPU, its metadata)``.

    Never runs code from the file (``weights_only``) and allocates nothing the file does not hold: the file's
    size is capped (:class:`~gkd_core.limits.InputLimits` ``model_bytes``), its records must be stored
    uncompressed (:func:`gkd_core.io.safe_torch_load`), the metadata is validated, and every tensor's name and
    shape is compared with the declared architecture built on the ``meta`` device (no memory) before the
    network is built for real. Raises :class:`ModelFileError` with one line for a missing, oversized, foreign,
    unsafe or inconsistent file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        limits().check_model_bytes(path.stat().st_size, str(path))
        blob = safe_torch_load(path)
    except (UnsafeFileError, LimitError) as err:
        raise ModelFileError(str(err)) from None
    if not isinstance(blob, dict) or blob.get("format") not in _READABLE:
        got = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ModelFileError(f"{path}: not a gkd model file (format {got!r}, expected {MODEL_FORMAT!r})")
    try:
        meta = ModelMeta.model_validate({k: v for k, v in blob.items() if k != "state_dict"})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "metadata"
        raise ModelFileError(f"{path}: invalid model metadata: {field}: {first['msg']}") from None
    state = blob.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: the file holds no state_dict of tensors")
    _check_shapes(path, meta, state)
    try:
        model = build_model(meta.model.name, num_classes=meta.num_classes, in_channels=meta.in_channels,
                            width=meta.model.width)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:300]
        raise ModelFileError(f"{path}: its weights do not fit the architecture it declares "
                             f"({meta.describe()}): {detail}") from None
    return model.eval(), meta


def _check_shapes(path: Path, meta: ModelMeta, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights whose names or shapes differ from the declared architecture, comparing with a skeleton
    on the ``meta`` device: metadata declaring a network far larger than the file's tensors (a 1 KB file
    claiming mobilenetv2 x8 with 100,000 classes, ~4.5 GB) is refused before any of it is allocated."""
    try:
        with torch.device("meta"):
            skeleton = build_model(meta.model.name, num_classes=meta.num_classes, in_channels=meta.in_channels,
                                   width=meta.model.width)
    except (RuntimeError, ValueError) as err:
        raise ModelFileError(f"{path}: cannot build the architecture it declares ({meta.describe()}): "
                             f"{str(err).strip().splitlines()[0][:200]}") from None
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problem = ""
    if missing := [k for k in want if k not in got]:
        problem = f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}"
    elif unexpected := [k for k in got if k not in want]:
        problem = f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}"
    elif wrong := [k for k in want if want[k] != got[k]]:
        k = wrong[0]
        problem = f"{len(wrong)} tensor(s) of another shape, e.g. {k!r} is {list(got[k])}, the architecture has {list(want[k])}"
    if problem:
        raise ModelFileError(f"{path}: its weights do not fit the architecture it declares ({meta.describe()}): "
                             f"{problem}")


def check_model(meta: ModelMeta, path: str | os.PathLike, role: str, data: Any,
                expected: Optional[ModelConfig] = None, params_field: str = "") -> None:
    """Refuse a model file that does not fit this run, before any compute (one line: field, both values, fix).

    ``role`` names the file in the message ("teacher", "student"); ``data`` is the run's prepared data;
    ``expected`` the architecture params.yaml asks for (``params_field`` its dotted name, for the message).
    """
    where = f"{role} file {path}"
    if expected is not None and (meta.model.name, float(meta.model.width)) != (expected.name, float(expected.width)):
        raise ModelFileError(
            f"{where} is {meta.model.name} width {meta.model.width:g}, but {params_field or 'params'} asks for "
            f"{expected.name} width {expected.width:g}: retrain it (dvc repro) or set {params_field or 'params'} "
            "to match the file")
    h, w = data.image_hw
    if (meta.in_channels, *meta.input_hw) != (data.in_channels, h, w):
        mh, mw = meta.input_hw
        raise ModelFileError(
            f"{where} takes {meta.in_channels}x{mh}x{mw} images, the prepared data has "
            f"{data.in_channels}x{h}x{w} (another dataset?): use a {role} trained on this dataset")
    if meta.num_classes != data.num_classes or list(meta.classes) != list(data.classes):
        raise ModelFileError(
            f"{where} predicts {meta.num_classes} classes {_short(meta.classes)}, the prepared data has "
            f"{data.num_classes} {_short(data.classes)}: use a {role} trained on this dataset")
    data_hash = data.meta.get("sha256")
    if meta.data_hash and data_hash and meta.data_hash != data_hash:
        raise ModelFileError(
            f"{where} was trained on prepared data {meta.data_hash[:12]}, this run's data is {data_hash[:12]} "
            "(another split, seed or limit: its scores would not be comparable, and it may have seen this run's "
            f"validation or test images): retrain the {role} on this data (dvc repro)")


ONNX_META_PREFIX = "gkd."  # keys of the ONNX file's metadata_props written by onnx_metadata()


def onnx_metadata(meta: ModelMeta) -> dict[str, str]:
    """What the ONNX file carries about its model (``metadata_props``: string keys and values): the model
    (name, width), the input it takes (channels, height, width, the normalisation mean and std), the classes,
    the data hash. Lists are JSON. ``gkd.input`` says the graph takes normalised float32 NCHW."""
    h, w = meta.input_hw
    fields = {
        "format": meta.format,
        "model": meta.model.name,
        "model_width": repr(float(meta.model.width)),
        "num_classes": str(meta.num_classes),
        "in_channels": str(meta.in_channels),
        "image_size": str(meta.image_size),
        "image_hw": json.dumps([h, w]),
        "mean": json.dumps([float(v) for v in meta.mean]),
        "std": json.dumps([float(v) for v in meta.std]),
        "classes": json.dumps(list(meta.classes)),
        "data_hash": meta.data_hash or "",
        "input": "float32 NCHW, (uint8 image / 255 - mean) / std per channel",
    }
    return {ONNX_META_PREFIX + k: v for k, v in fields.items()}


def meta_from_onnx_props(props: Mapping[str, str], where: str = "ONNX file") -> ModelMeta:
    """The :class:`ModelMeta` of an ONNX file's ``metadata_props`` (see :func:`onnx_metadata`); raises
    :class:`ModelFileError` with one line when they are missing or invalid."""
    got = {k[len(ONNX_META_PREFIX):]: v for k, v in props.items() if k.startswith(ONNX_META_PREFIX)}
    if "classes" not in got or "model" not in got:
        raise ModelFileError(f"{where}: no gkd metadata in the ONNX file (classes, input size, normalisation): "
                             "export it again with this version (dvc repro export_onnx)")
    try:
        blob = {
            "format": got.get("format", MODEL_FORMAT),
            "model": {"name": got["model"], "width": float(got.get("model_width", 1.0))},
            "num_classes": int(got["num_classes"]),
            "in_channels": int(got["in_channels"]),
            "image_size": int(got["image_size"]),
            "image_hw": json.loads(got["image_hw"]) if got.get("image_hw") else None,
            "mean": json.loads(got["mean"]),
            "std": json.loads(got["std"]),
            "classes": json.loads(got["classes"]),
            "data_hash": got.get("data_hash") or None,
        }
        return ModelMeta.model_validate(blob)
    except (KeyError, ValueError, TypeError) as err:
        detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else f"{type(err).__name__}: {err}"
        raise ModelFileError(f"{where}: invalid gkd metadata in the ONNX file ({detail})") from None


def _short(classes: list[str], n: int = 4) -> str:
    shown = ", ".join(classes[:n])
    return f"[{shown}{', ...' if len(classes) > n else ''}]"
