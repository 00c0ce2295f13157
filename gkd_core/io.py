"""Atomic file writing: every output is written to a temp file in the same directory, then renamed.

A crash or a refused input therefore never leaves a half-written file where a finished one is expected.
The finished file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` minus the umask, so
0644 under the usual umask 022): ``mkstemp`` creates its temp file 0600, readable by its owner only.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status); else
    set and restored at once under a lock (``os.umask`` is the only portable way to read it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a newly created file gets from ``open()``: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp's 0600 -> what open() would have given (0644 under umask 022)
    finally:
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temp file for writing (text by default, ``mode="wb"`` for bytes) that replaces ``path`` on close."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temp file (imported lazily so this module stays torch-free).

    Saved through a file object, not the temp path: torch names the zip records after the file it is given,
    and a random temp name would make every save of the same object differ in its bytes (DVC would then
    see a changed output, and rerun everything downstream, after a forced rerun of a deterministic stage).
    """
    import torch

    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


class UnsafeFileError(ValueError):
    """A torch file that is unreadable, or holds more than tensors and plain data (loading it could run code).
    ``str(err)`` is ``"<path>: <reason>"``; ``err.reason`` the part after the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, numbers, strings, lists, tuples and dicts
    only, so a file carrying pickled code (a ``__reduce__`` payload, a pickled class) is refused, never run.
    Raises :class:`UnsafeFileError` with one line naming the file."""
    import torch

    _check_torch_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), "")
        raise UnsafeFileError(
            path, "refused: the file holds Python objects beyond tensors and plain data, and loading it could "
            f"run code{f' ({detail[:200]})' if detail else ''}; only files written by gkd are accepted"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for truncated or foreign files
        first = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else ""
        raise UnsafeFileError(path, f"not a readable torch file ({type(err).__name__}: {first})") from None


def _check_torch_zip(path: str | os.PathLike) -> None:
    """Refuse, from the zip index alone, a torch file whose records are compressed: ``torch.save`` stores
    them, so what loading allocates is bounded by the file's size; a deflated record (a 190 KB file holding a
    190 MB tensor of zeros) is a decompression bomb. A file that is not a zip archive is not a torch file
    this project writes (the legacy pre-1.6 format is not read)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UnsafeFileError(path, f"not a readable torch file ({type(err).__name__}: not a torch zip archive)"
                              ) from None
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UnsafeFileError(path, f"refused: {len(packed)} compressed record(s) (e.g. {packed[0]!r}); torch.save "
                              "stores its records uncompressed, and a compressed one can inflate far beyond the "
                              "file's size")
