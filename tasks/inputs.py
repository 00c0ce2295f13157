"""A stage's upstream files, checked before any work: present, and readable as what they should be.

A missing or unreadable file is the user's to fix: :class:`gkd_core.cli_support.UserError` with one message
naming the stage that writes it (the stage CLIs turn it into exit code 2). Params are checked by
:func:`gkd_core.cli_support.load_params_checked`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from gkd_core.cli_support import UserError
from gkd_core.data import DatasetError, PreparedData, load_prepared
from gkd_core.modelfile import ModelFileError, ModelMeta, check_model, read_model
from gkd_core.sections import ModelConfig


def require_file(path: str | os.PathLike, what: str, produced_by: str) -> Path:
    """The path of an upstream output, or UserError naming the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} (written by the {produced_by} stage; run `dvc repro {produced_by}`)")
    return path


def load_prepared_checked(path: str | os.PathLike) -> PreparedData:
    """``gkd_core.data.load_prepared`` with a missing or unreadable file reported as UserError."""
    require_file(path, "prepared dataset", "prepare_data")
    try:
        return load_prepared(path)
    except (DatasetError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None


def load_model_checked(path: str | os.PathLike, role: str, produced_by: str, data: Optional[PreparedData] = None,
                       expected: Optional[ModelConfig] = None, params_field: str = "") -> tuple[Any, ModelMeta]:
    """A model file as ``(model, metadata)``, read without running code and checked against this run (the
    architecture params.yaml names at ``params_field``, the prepared ``data``) before any compute; a missing,
    unsafe, foreign or mismatched file is a UserError with one line naming the mismatch and the fix."""
    require_file(path, f"{role} model", produced_by)
    try:
        model, meta = read_model(path)
        if data is not None:
            check_model(meta, path, role, data, expected=expected, params_field=params_field)
    except ModelFileError as err:
        raise UserError(str(err)) from None
    return model, meta
