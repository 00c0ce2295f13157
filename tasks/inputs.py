"""A stage's upstream files, checked before any work: present, and readable as what they should be.

A missing or unreadable file is the user's to fix: :class:`gkd_core.cli_support.UserError` with one message
naming the stage that writes it (the stage CLIs turn it into exit code 2). Params are checked by
:func:`gkd_core.cli_support.load_params_checked`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gkd_core.cli_support import UserError
from gkd_core.data import DatasetError, PreparedData, load_prepared
from gkd_core.runner import load_model


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


def load_model_checked(path: str | os.PathLike, what: str, produced_by: str) -> tuple[Any, dict[str, Any]]:
    """``gkd_core.runner.load_model`` (model, metadata) with a missing or foreign file reported as UserError."""
    require_file(path, what, produced_by)
    try:
        return load_model(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
