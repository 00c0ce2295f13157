"""Training progress on the console: a rich progress bar when stderr is a terminal, nothing extra otherwise.

:class:`TrainingProgress` is what :func:`gkd_core.engine.fit` updates once per step and once per epoch. The
per-epoch log line (``teacher epoch 3/20 lr=... train_total=... val_accuracy=...``) is logged either way; on a
terminal the bar (steps of the whole run, the epoch, the last loss and validation accuracy, time left) stays
below the log lines while it runs and is removed at the end, so a finished run reads as its log lines alone.
Off a terminal (CI, ``> log.txt``, Prefect workers) there is no bar, only those lines.

``enabled``: ``True`` / ``False``, or ``"auto"`` (params' ``runtime.progress_bar``, the default) for "when
stderr is a terminal".
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterator, Optional, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["TrainingProgress", "bar_wanted"]


def bar_wanted(enabled: Union[bool, str, None], stream: Any = None) -> bool:
    """``enabled`` resolved: ``"auto"`` / ``None`` mean "when ``stream`` (stderr) is a terminal"."""
    if enabled is None or enabled == "auto":
        stream = sys.stderr if stream is None else stream
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False
    return bool(enabled)


@contextlib.contextmanager
def _logs_above_the_bar(progress: Progress, real_stderr: Any) -> Iterator[None]:
    """While the bar is live, log lines must go through its console (printed above the bar, not through it):
    a rich ``RichHandler`` of the root logger gets the bar's console, a plain stream handler on stderr the
    proxy rich put in place of ``sys.stderr``. Both are put back afterwards."""
    from rich.logging import RichHandler

    consoles, streams = [], []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            consoles.append((handler, handler.console))
            handler.console = progress.console
        elif (isinstance(handler, logging.StreamHandler) and sys.stderr is not real_stderr
              and getattr(handler, "stream", None) is real_stderr):
            streams.append((handler, handler.stream))
            handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler, console in consoles:
            handler.console = console
        for handler, stream in streams:
            handler.setStream(stream)


class TrainingProgress:
    """Steps and epochs of one training run (see the module docstring); ``update``/``end_epoch``/``close``."""

    def __init__(self, desc: str, epochs: int, steps_per_epoch: int, start_epoch: int = 0,
                 enabled: Union[bool, str, None] = "auto"):
        self.desc, self.epochs, self.steps_per_epoch = desc, epochs, steps_per_epoch
        self._progress: Optional[Progress] = None
        self._redirect: Optional[contextlib.AbstractContextManager[None]] = None
        if not bar_wanted(enabled):
            return
        real_stderr = sys.stderr
        console = Console(file=real_stderr, stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=console, transient=True, redirect_stdout=False, redirect_stderr=True,
        )
        self._task = self._progress.add_task(self._label(start_epoch + 1), total=epochs * steps_per_epoch,
                                             completed=start_epoch * steps_per_epoch, status="")
        self._progress.start()
        self._redirect = _logs_above_the_bar(self._progress, real_stderr)
        self._redirect.__enter__()

    @property
    def active(self) -> bool:
        return self._progress is not None

    def _label(self, epoch: int) -> str:
        return f"{self.desc} epoch {min(epoch, self.epochs)}/{self.epochs}"

    def update(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def end_epoch(self, epoch: int, loss: Optional[float] = None, val_accuracy: Optional[float] = None) -> None:
        """After epoch ``epoch`` (1-based): the label moves to the next epoch, the status shows the figures."""
        if self._progress is None:
            return
        status = " ".join(part for part in (
            f"loss {loss:.3f}" if loss is not None else "",
            f"val {val_accuracy:.3f}" if val_accuracy is not None else "") if part)
        self._progress.update(self._task, description=self._label(epoch + 1), status=status)

    def close(self) -> None:
        if self._progress is None:
            return
        try:
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
        finally:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
