"""Running a flow from its command line: when it fails, the cause is the last line the user sees.

A flow that fails leaves Prefect's own lines after it (the failed state, the temporary server stopping at
exit). :func:`run_flow` records the cause and prints it, as ``error: <cause>``, from an exit handler
registered *before* Prefect registers its own, so it runs after them (exit handlers run last-in, first-out).
The exit code says what failed: 2 bad input (a stage that refused its input included), 3 a run that went
non-finite, 1 anything else.
"""

from __future__ import annotations

import atexit
import sys
from typing import Callable, Optional, TypeVar

import typer

from gkd_core.cli_support import DIVERGED_EXIT_CODE, USER_ERROR_EXIT_CODE, UserError
from gkd_core.guard import NonFiniteLossError
from tasks.dvc_ops import StageFailed

T = TypeVar("T")
_CAUSE: list[str] = []


def _say_cause_last() -> None:
    if _CAUSE:
        sys.stderr.write(f"error: {_CAUSE[-1]}\n")
        sys.stderr.flush()


def install() -> None:
    """Call first thing in a flow's ``main`` (before anything starts a Prefect server)."""
    atexit.register(_say_cause_last)


def exit_code_of(err: BaseException) -> int:
    if isinstance(err, StageFailed) and err.exit_code in (USER_ERROR_EXIT_CODE, DIVERGED_EXIT_CODE):
        return int(err.exit_code)
    if isinstance(err, UserError):
        return USER_ERROR_EXIT_CODE
    if isinstance(err, NonFiniteLossError):
        return DIVERGED_EXIT_CODE
    return 1


def run_flow(call: Callable[[], T], what: Optional[str] = None) -> T:
    """``call()`` (a flow run); on failure record its cause for the last line and exit with its code."""
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - any failure ends the command with its cause as the last line
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _CAUSE.append(f"{what}: {message}" if what else message)
        raise typer.Exit(exit_code_of(err)) from None
