"""What every command line of the project shares (``gkd`` in gkd_core/cli.py, the stage CLIs in tasks/ and
the flows' CLIs): the user-error class, ``-S key=value`` overrides, validated params, and running a command
body so that bad input ends with one message and exit code 2, before any compute and with nothing written.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional

import typer
import yaml

from gkd_core.checkpoints import CheckpointError
from gkd_core.config import ConfigError, Params, load_params
from gkd_core.data import DatasetError, check_dataset_source
from gkd_core.guard import NonFiniteLossError
from gkd_core.methods.spec import MethodSetupError
from gkd_core.io import write_json

USER_ERROR_EXIT_CODE = 2  # bad input: fix it, rerunning the same command fails the same way
DIVERGED_EXIT_CODE = 3  # training went non-finite: deterministic, rerunning it as is fails the same way
ERROR_FILE_ENV = "GKD_ERROR_FILE"  # where a failing command writes {"exit_code", "kind", "error"} (the flows read it)


class UserError(Exception):
    """Bad input the user can fix (params, dataset path, model name, a missing upstream file).

    Command lines report it as one message on stderr, without a traceback, and exit with code 2.
    """


def parse_overrides(items: Optional[Iterable[str]]) -> dict[str, Any]:
    """``["method.name=kd", "seed=3"]`` -> ``{"method.name": "kd", "seed": 3}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. method.gompertz.c=6.0")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_params_checked(path: str | os.PathLike, overrides: Optional[Mapping[str, Any]] = None,
                        check_dataset: bool = True) -> Params:
    """Validated params (and, by default, an existing dataset source) or UserError.

    These are the cheap checks: no data is read and nothing is written.
    """
    try:
        params = load_params(path, dict(overrides or {}))
        if check_dataset:
            check_dataset_source(params.dataset)
    except (ConfigError, DatasetError) as err:
        raise UserError(str(err)) from None
    return params


def _to_stderr(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def run_cli(body: Callable[[], Any], report: Callable[[str], Any] = _to_stderr) -> Any:
    """Run a command body and return its result. A failure that rerunning cannot fix ends the command with one
    message passed to ``report`` (default: ``error: <message>`` on stderr), no traceback, and its exit code:
    bad input (:class:`UserError`, an unusable checkpoint, a method that cannot be set up) exits 2, a run that went non-finite exits 3. With
    ``$GKD_ERROR_FILE`` set, the same facts are written there as JSON (the flows read them: no retry, and the
    cause is the last line the user sees)."""
    try:
        return body()
    except (UserError, CheckpointError, MethodSetupError) as err:
        _fail(str(err), "user_input", USER_ERROR_EXIT_CODE, report)
    except NonFiniteLossError as err:
        _fail(str(err), "non_finite", DIVERGED_EXIT_CODE, report)


def _fail(message: str, kind: str, code: int, report: Callable[[str], Any]) -> None:
    report(message)
    path = os.environ.get(ERROR_FILE_ENV, "").strip()
    if path:
        write_json(path, {"exit_code": code, "kind": kind, "error": message})
    raise typer.Exit(code) from None
