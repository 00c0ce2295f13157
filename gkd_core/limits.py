"""Limits on untrusted input: what one image, archive member, archive, request or model file may cost.

Everything that decodes or loads something from outside (``gkd predict``, the served model, the
image_folder dataset, the model-file readers) checks these *before* it allocates for the input, and refuses
with one line naming the input and the limit. The defaults fit this project's use (small classifiers on
photos and datasets of images) with room to spare; each can be changed with an environment variable, which is
how a served model (``mlflow models serve``) or a worker is configured, and ``gkd predict`` has flags too.

=====================  ========================  ===========  =================================================
limit                  environment variable       default      what it bounds
=====================  ========================  ===========  =================================================
``image_pixels``       ``GKD_MAX_IMAGE_PIXELS``   40,000,000   width x height of one image, read from its header
                                                               before it is decoded (a 160 KB PNG can declare
                                                               13000 x 13000 = 169 M pixels, ~650 MB decoded)
``file_bytes``         ``GKD_MAX_FILE_BYTES``     64 MiB       one image file, archive member or request value
``archive_members``    ``GKD_MAX_ARCHIVE_MEMBERS`` 2,000,000   entries of one tar archive
``request_rows``       ``GKD_MAX_REQUEST_ROWS``   1,024        images in one request to the served model
``model_bytes``        ``GKD_MAX_MODEL_BYTES``    1 GiB        a model file (.pt or .onnx) on disk
=====================  ========================  ===========  =================================================
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["InputLimits", "LimitError", "ENV_VARS", "limits", "using_limits"]


class LimitError(ValueError):
    """An input over one of the :class:`InputLimits`, or a limit set to a value that is not allowed."""


class InputLimits(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_pixels: int = Field(40_000_000, ge=1)
    file_bytes: int = Field(64 * 2**20, ge=1)
    archive_members: int = Field(2_000_000, ge=1)
    request_rows: int = Field(1024, ge=1)
    model_bytes: int = Field(2**30, ge=1)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Optional[int]) -> "InputLimits":
        """The defaults, then the environment (:data:`ENV_VARS`), then ``overrides`` that are not None; a value
        that is not a positive integer raises :class:`LimitError` naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, int] = {}
        for field, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            text = raw.strip().replace("_", "")
            if not text.isdigit() or int(text) < 1:
                raise LimitError(f"{var}={raw!r}: expected a positive integer (default "
                                 f"{cls.model_fields[field].default:,})")
            values[field] = int(text)
        for field, value in overrides.items():
            if value is not None:
                if field not in ENV_VARS:
                    raise TypeError(f"unknown limit {field!r}")
                if int(value) < 1:
                    raise LimitError(f"{field.replace('_', '-')} {value}: expected a positive integer")
                values[field] = int(value)
        return cls(**values)

    def _refuse_over(self, field: str, value: int, said: str, unit: str = "", advice: str = "") -> None:
        """:class:`LimitError` ``"<said>, over the limit of <limit><unit> (<variable>)<advice>"`` when ``value``
        exceeds the limit ``field``."""
        limit = getattr(self, field)
        if value > limit:
            raise LimitError(f"{said}, over the limit of {limit:,}{unit} ({ENV_VARS[field]}){advice}")

    def check_pixels(self, width: int, height: int, name: str) -> None:
        self._refuse_over("image_pixels", width * height,
                          f"{name}: image is {width}x{height} = {width * height:,} pixels")

    def check_file_bytes(self, size: int, name: str) -> None:
        self._refuse_over("file_bytes", size, f"{name}: {size:,} bytes", " bytes per image")

    def check_rows(self, rows: int) -> None:
        self._refuse_over("request_rows", rows, f"{rows:,} images in one request",
                          advice=": send them in smaller requests")

    def check_model_bytes(self, size: int, name: str) -> None:
        self._refuse_over("model_bytes", size, f"{name}: model file of {size:,} bytes")

ENV_VARS: dict[str, str] = {
    "image_pixels": "GKD_MAX_IMAGE_PIXELS",
    "file_bytes": "GKD_MAX_FILE_BYTES",
    "archive_members": "GKD_MAX_ARCHIVE_MEMBERS",
    "request_rows": "GKD_MAX_REQUEST_ROWS",
    "model_bytes": "GKD_MAX_MODEL_BYTES",
}


_OVERRIDE: contextvars.ContextVar[Optional[InputLimits]] = contextvars.ContextVar("gkd_limits", default=None)


def limits() -> InputLimits:
    """The limits in force now: those of an enclosing :func:`using_limits`, else the defaults overridden by the
    environment (read on every call: cheap, and a server's environment may change)."""
    return _OVERRIDE.get() or InputLimits.from_env()


@contextlib.contextmanager
def using_limits(chosen: InputLimits) -> Iterator[InputLimits]:
    """``chosen`` in force for the calls inside (this thread or task; not a process-wide change, so a command
    run in-process leaves no trace). Code that hands work to other threads passes the limits along."""
    token = _OVERRIDE.set(chosen)
    try:
        yield chosen
    finally:
        _OVERRIDE.reset(token)
