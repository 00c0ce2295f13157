"""The training stages on several processes: with ``runtime.nproc > 1`` a stage command relaunches itself
under torchrun (``python -m torch.distributed.run``), so ``dvc repro`` and the flows run it unchanged.

    runtime: {nproc: 4}    # params.yaml: 4 processes (one per GPU) on this node, torchrun --standalone
    GKD_TORCHRUN_ARGS="--nnodes 2 --node-rank K --master-addr node0 --master-port 29500"
                           # several nodes (K = 0, 1 on each): torchrun's flags replace --standalone; with
                           # --node-rank, global rank 0 (the writer) is on node 0 (docs/performance.md)

The relaunched command is the same stage module with the same options; each worker sees torchrun's
environment (``RANK``, ``WORLD_SIZE``, ...), trains as one rank (gkd_core joins the process group), and only
rank 0 writes files and logs to MLflow. A command already running under torchrun is never relaunched; a
SIGTERM to the command reaches torchrun, which stops the workers. When a worker fails, torchrun stops the
others and names the failed rank; the command then exits with the worker's
own exit code when it reported one (``$GKD_ERROR_FILE``: 2 bad input, 3 non-finite), else torchrun's.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from gkd_core.cli_support import ERROR_FILE_ENV, UserError, load_params_checked

logger = logging.getLogger(__name__)

TORCHRUN_ARGS_ENV = "GKD_TORCHRUN_ARGS"


def under_torchrun() -> bool:
    """Whether this process is a torchrun worker (torchrun sets these for every worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def processes_to_launch(params_path: str | os.PathLike, overrides: Optional[Mapping[str, Any]]) -> int:
    """``runtime.nproc`` of the validated params, checked against this machine (UserError before any compute):
    at most one process per GPU on CUDA, and SyncBatchNorm only on CUDA."""
    params = load_params_checked(params_path, overrides, check_dataset=False)
    rt = params.runtime
    if rt.nproc <= 1:
        return 1
    cuda = rt.device.startswith("cuda") or (rt.device == "auto" and torch.cuda.is_available())
    if cuda and rt.nproc > torch.cuda.device_count():
        raise UserError(f"runtime.nproc = {rt.nproc}, but this machine has {torch.cuda.device_count()} GPU(s): "
                        "one process per GPU")
    if rt.sync_batchnorm and not cuda:
        raise UserError("runtime.sync_batchnorm = true needs CUDA (torch.nn.SyncBatchNorm has no CPU kernels)")
    return rt.nproc


def stage_module(stage_fn: Any) -> str:
    """The module to relaunch: the stage function's, or the ``python -m`` module running as ``__main__``."""
    name = getattr(stage_fn, "__module__", "__main__")
    if name != "__main__":
        return name
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None or not spec.name:
        raise UserError("runtime.nproc > 1: run the stage as a module (python -m tasks.<stage>) so it can be relaunched")
    return spec.name


def torchrun_command(nproc: int, module: str, argv: Sequence[str], rdzv: Optional[str] = None) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node N <--standalone | $GKD_TORCHRUN_ARGS> -m module argv``."""
    extra = rdzv if rdzv is not None else os.environ.get(TORCHRUN_ARGS_ENV, "")
    flags = shlex.split(extra) if extra.strip() else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *flags,
            "-m", module, *argv]


def stage_argv(params_path: Path, overrides: Optional[Sequence[str]], out_dir: Optional[Path],
               parent_run_id: Optional[str], verbose: bool, extra: Mapping[str, Any]) -> list[str]:
    """The stage's command-line options, rebuilt from their parsed values."""
    argv = ["--params", str(params_path)]
    for item in overrides or []:
        argv += ["--set", item]
    if out_dir is not None:
        argv += ["--out-dir", str(out_dir)]
    if parent_run_id:
        argv += ["--parent-run-id", parent_run_id]
    if verbose:
        argv.append("--verbose")
    for name, value in extra.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def relaunch(nproc: int, module: str, argv: Sequence[str]) -> int:
    """Run the stage on ``nproc`` processes under torchrun; returns the exit code the command should end with."""
    own_error_file = not os.environ.get(ERROR_FILE_ENV, "").strip()
    env = dict(os.environ)
    if own_error_file:
        fd, path = tempfile.mkstemp(prefix="gkd-error-", suffix=".json")
        os.close(fd)
        os.unlink(path)  # the workers create it only when they fail
        env[ERROR_FILE_ENV] = path
    error_file = Path(env[ERROR_FILE_ENV])
    before = _mtime(error_file)  # a caller's file may hold an earlier command's error
    cmd = torchrun_command(nproc, module, argv)
    logger.info("runtime.nproc = %d: %s", nproc, shlex.join(cmd))
    try:
        code = _run_forwarding_signals(cmd, env)
        if code == 0:
            return 0
        reported = _read_error(error_file) if _mtime(error_file) != before else None
        if reported is not None:
            logger.error("%s", reported["error"])
            return int(reported["exit_code"])
        logger.error("the %d training processes failed (torchrun exit code %d); the failed rank and its error "
                     "are named above", nproc, code)
        return code
    finally:
        if own_error_file:
            error_file.unlink(missing_ok=True)


def _run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``cmd`` and wait; SIGTERM / SIGHUP sent to this process (a cancelled flow run, a stopped worker)
    go on to torchrun, which stops its workers; any other way out of the wait stops it too. No training
    process outlives the command."""
    proc = subprocess.Popen(list(cmd), env=dict(env))
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    try:
        code = proc.wait()
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # KeyboardInterrupt or another error while waiting
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _mtime(path: Path) -> Optional[int]:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _read_error(path: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "exit_code" in data and "error" in data else None
