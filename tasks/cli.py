"""The stage command lines: one factory builds every stage's typer app, plus the logging setup of a stage
process.

    app = stage_app(prepare_data, __doc__)                                       # tasks/prepare_data.py
    app = stage_app(export_onnx, __doc__, option("strict", False, "fail ..."))   # + a stage-specific option

Every app has the shared options ``--params/-p``, ``--set/-S`` (repeatable), ``--out-dir``, ``--parent-run-id``
(env ``GKD_MLFLOW_PARENT_RUN_ID``) and ``--verbose/-v``, and calls
``stage(StagePaths(".", out_dir), params_path=..., overrides=..., parent_run_id=..., **extras)``. Bad input
(:class:`gkd_core.cli_support.UserError`) ends with one message on stderr and exit code 2, nothing written.

A training stage (``stage_app(..., distributed=True)``) with ``runtime.nproc > 1`` relaunches itself under
torchrun with that many processes (:mod:`tasks.launch`); under torchrun, ranks other than 0 log warnings only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from gkd_core.cli_support import parse_overrides, run_cli
from gkd_core.distributed import rank as process_rank, shutdown as leave_process_group
from tasks import launch, project_lock
from tasks.paths import PARAMS_FILE, StagePaths
from tasks.tracking import PARENT_ENV

logger = logging.getLogger(__name__)
QUIET_LOGGERS = ("alembic", "urllib3", "matplotlib", "PIL", "git", "httpx", "filelock")


def configure_logging(verbose: bool = False) -> None:
    """Plain stderr logging for stage and flow processes (DVC and Prefect capture and show it as is); a torchrun
    worker of rank > 0 logs warnings and errors only, marked with its rank."""
    rank = process_rank() if launch.under_torchrun() else 0
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING),
        format="%(asctime)s %(levelname)-7s " + (f"[rank {rank}] " if rank else "") + "%(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def option(name: str, default: Any, help: str, *flags: str, annotation: Any = None,
           envvar: Optional[str] = None) -> inspect.Parameter:
    """A CLI option, passed to the stage function as keyword ``name`` (``--name`` unless ``flags`` are given;
    a bool becomes ``--name/--no-name``); its type is ``annotation``, by default the default's type."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=type(default) if annotation is None else annotation,
                             default=typer.Option(default, *flags, help=help, envvar=envvar))


SHARED_OPTIONS = (
    option("params_path", Path(PARAMS_FILE), "params.yaml to read (validated before any work)", "--params", "-p",
           annotation=Path),
    option("overrides", None, "override a param for this run only: -S method.gompertz.c=6.0 (repeatable)",
           "--set", "-S", annotation=Optional[list[str]]),
    option("out_dir", None, "write the outputs under this folder (same layout) instead of the project folder; "
           "the prepared data and the teacher are still read from the project", annotation=Optional[Path]),
    option("parent_run_id", None, "MLflow run id to nest this stage's run under (the pipeline flow sets it)",
           annotation=Optional[str], envvar=PARENT_ENV),
    option("verbose", False, "debug logging", "--verbose", "-v"),
)


def stage_app(stage: Callable[..., Any], doc: Optional[str], *extras: inspect.Parameter,
              distributed: bool = False) -> typer.Typer:
    """The typer app of ``stage``: the shared options plus ``extras`` (see :func:`option`); help from the
    first paragraph of ``doc`` (the stage module's docstring). ``distributed``: a training stage, run on
    ``runtime.nproc`` processes (see the module docstring)."""
    summary = (doc or stage.__name__).split("\n\n")[0]

    def command(params_path: Path, overrides: Optional[list[str]], out_dir: Optional[Path],
                parent_run_id: Optional[str], verbose: bool, **extra: Any) -> None:
        configure_logging(verbose)
        with contextlib.ExitStack() as writer:  # one writer per output folder (tasks/project_lock.py)
            run_cli(lambda: writer.enter_context(project_lock.one_writer(out_dir or Path("."), stage.__name__)),
                    report=logger.error)
            if distributed and not launch.under_torchrun():
                nproc = run_cli(lambda: launch.processes_to_launch(params_path, parse_overrides(overrides)),
                                report=logger.error)
                if nproc > 1:
                    argv = launch.stage_argv(params_path, overrides, out_dir, parent_run_id, verbose, extra)
                    code = launch.relaunch(nproc, launch.stage_module(stage), argv)
                    if code:
                        raise typer.Exit(code)
                    return
            run_cli(lambda: stage(StagePaths(Path("."), out_dir), params_path=params_path,
                                  overrides=parse_overrides(overrides), parent_run_id=parent_run_id, **extra),
                    report=logger.error)
        if distributed:
            leave_process_group()  # after a finished run on every rank (a no-op in one process)

    command.__signature__ = inspect.Signature([*SHARED_OPTIONS, *extras])  # typer reads the options from it
    command.__doc__ = summary
    app = typer.Typer(add_completion=False, help=summary)
    app.command()(command)
    return app

