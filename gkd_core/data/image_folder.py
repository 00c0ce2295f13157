"""Image folders: an ImageFolder tree read from a directory or a tar archive, decoded with PIL.

Layout: ``train/<class>/*`` and ``test/<class>/*`` (``val/`` stands in for a missing ``test/``), or just
``<class>/*``; one leading folder shared by every image is skipped. Without a test folder a fixed stratified
20 % is held out as the test split (:data:`gkd_core.data.raw.TEST_SPLIT_SEED`). Images are converted to RGB
and optionally resized to ``dataset.image_size``; a tar archive is read in one streaming pass while a thread
pool decodes chunks of images.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
import stat
import tarfile
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from gkd_core.limits import InputLimits, LimitError, limits
from gkd_core.sections import DatasetConfig
from gkd_core.data.raw import TEST_FRACTION, TEST_SPLIT_SEED, DatasetError, RawDataset, _root, stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
_DECODE_CHUNK = 512


@dataclass(frozen=True)
class Refused:
    """Stands in for an image's bytes that were not read (over a limit, not a regular file): ``reason`` is
    the one line to report. Yielded by :func:`iter_images` with ``keep_going``; the dataset reader refuses."""

    reason: str


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_name(parts: Sequence[str]) -> bool:
    return (
        bool(parts)
        and not any(p.startswith(".") for p in parts)
        and parts[-1].lower().endswith(IMAGE_EXTENSIONS)
    )


def _split_name(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _unsafe_member(member: tarfile.TarInfo) -> Optional[str]:
    """Why a member must not be read as an image (a link, a device, a name leaving the archive), or None."""
    if member.isdir():
        return None
    if not member.isfile():
        return "a link or special file"
    name = member.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a path leaving the archive"
    return None


def _iter_archive(path: Path, lim: InputLimits, keep_going: bool = False
                  ) -> Iterator[tuple[tuple[str, ...], Union[bytes, Refused]]]:
    """Yield ``(path parts, bytes)`` of the image members of a tar archive, in archive order (one pass).

    Links, devices and names that leave the archive (``..``, absolute) are never read; they are counted and
    reported once, with examples, at the end. A member over ``lim.file_bytes`` is refused by its header,
    before it is read (with ``keep_going``: yielded as :class:`Refused`); an archive of more than
    ``lim.archive_members`` entries is refused when it gets there. Read members are not kept (a streamed
    ``TarFile`` would otherwise hold every header until the end)."""
    count = entries = 0
    skipped: list[tuple[str, str]] = []
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                tf.members = []  # stream mode appends every header; nothing here needs them again
                entries += 1
                if entries > lim.archive_members:
                    raise LimitError(f"{path}: more than {lim.archive_members:,} archive entries "
                                     "(GKD_MAX_ARCHIVE_MEMBERS)")
                why = _unsafe_member(member)
                if why is not None:
                    skipped.append((member.name, why))
                    continue
                if not member.isfile():
                    continue
                parts = _split_name(member.name)
                if not _is_image_name(parts):
                    continue
                try:
                    lim.check_file_bytes(member.size, f"{path}: member {member.name}")
                except LimitError as refusal:
                    if not keep_going:
                        raise
                    yield parts, Refused(str(refusal))
                    continue
                fh = tf.extractfile(member)
                data = fh.read(member.size) if fh is not None else b""
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
                count += 1
                yield parts, data
    except LimitError as err:
        raise DatasetError(str(err)) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as err:
        raise DatasetError(
            f"{path}: corrupt or truncated archive after {count} images ({type(err).__name__}: {err})"
        ) from None
    finally:
        if skipped:
            kinds: dict[str, list[str]] = {}
            for name, why in skipped:
                kinds.setdefault(why, []).append(name)
            detail = "; ".join(f"{len(names)} {why} (e.g. {names[0]!r})" for why, names in kinds.items())
            log.warning("%s: skipped %d archive members that are not regular files inside the archive: %s",
                        path, len(skipped), detail)


def _iter_directory(path: Path) -> list[tuple[tuple[str, ...], Path]]:
    """The image files of a folder tree, sorted; entries that are not regular files (FIFOs, sockets,
    devices: reading one can block forever) are skipped and reported once."""
    items = []
    special: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(path).parts
        for name in sorted(filenames):
            parts = (*rel, name)
            if _is_image_name(parts):
                file = Path(dirpath) / name
                try:
                    mode = file.stat().st_mode
                except OSError:
                    mode = 0
                if not stat.S_ISREG(mode):
                    special.append(str(file))
                    continue
                items.append((parts, file))
    if special:
        log.warning("%s: skipped %d entries that are not regular files (FIFOs, sockets, devices, broken links), "
                    "e.g. %s", path, len(special), special[0])
    return items


def is_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a tar archive this module reads (:data:`ARCHIVE_SUFFIXES`)."""
    return _is_archive(Path(path))


def iter_images(source: str | os.PathLike, keep_going: bool = False
                ) -> Iterator[tuple[tuple[str, ...], Union[bytes, Path, Refused]]]:
    """The images of a folder or a tar archive, under the reading rules of the image_folder dataset (image
    extensions only, hidden files and folders skipped; a folder in sorted order, an archive in one streaming
    pass): ``(path parts relative to the source, file path or member bytes)``; with ``keep_going`` a member
    over the size limit comes as :class:`Refused` instead of ending the listing. Used by ``gkd predict``."""
    path = Path(source)
    if path.is_dir():
        yield from _iter_directory(path)
    elif _is_archive(path) and path.is_file():
        yield from _iter_archive(path, limits(), keep_going)
    else:
        raise DatasetError(f"{path}: not a folder or a tar archive ({', '.join(ARCHIVE_SUFFIXES)})")


def read_image_file(path: Path, lim: InputLimits) -> bytes:
    """The bytes of one image file: a regular file within ``lim.file_bytes`` (a FIFO would block, a huge
    file would be read whole), else :class:`LimitError` / :class:`OSError` naming it."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path}: not a regular file")
    lim.check_file_bytes(st.st_size, str(path))
    with open(path, "rb") as fh:
        return fh.read(lim.file_bytes + 1)


def open_image(data: bytes, lim: InputLimits, name: str) -> Image.Image:
    """A lazily opened PIL image whose header size is within ``lim.image_pixels`` (checked before decoding:
    a small PNG can declare gigabytes of pixels). The caller loads and closes it."""
    im = Image.open(io.BytesIO(data))
    try:
        lim.check_pixels(im.size[0], im.size[1], name)
    except LimitError:
        im.close()
        raise
    return im


def _decode_image(data: Union[bytes, Path], name: str, size: Optional[int], lim: InputLimits) -> np.ndarray:
    try:
        if isinstance(data, Path):
            data = read_image_file(data, lim)
        with open_image(data, lim, name) as im:
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except LimitError as err:
        raise DatasetError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a corrupt member
        raise DatasetError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def _decode_chunk(chunk: list[tuple[str, Union[bytes, Path]]], size: Optional[int],
                  lim: InputLimits) -> list[np.ndarray]:
    return [_decode_image(data, name, size, lim) for name, data in chunk]


def _decode_all(
    items: Iterable[tuple[tuple[str, ...], Union[bytes, Path]]],
    source: Path,
    size: Optional[int],
    total: Optional[int],
) -> tuple[list[tuple[str, ...]], list[np.ndarray]]:
    """Decode ``items`` in chunks on a thread pool while the caller's iterator keeps reading."""
    Image.init()  # register the format plugins once, before threads race to do it
    lim = limits()  # the caller's, handed to the decoding threads (a context-local override does not reach them)
    workers = max(1, min(8, os.cpu_count() or 1))
    names: list[tuple[str, ...]] = []
    arrays: list[np.ndarray] = []
    pending: deque[Future] = deque()
    chunk: list[tuple[str, Union[bytes, Path]]] = []
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gkd-decode")
    bar = tqdm(total=total, desc=f"decoding {source.name}", unit="img", disable=None, leave=False)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            done = pending.popleft().result()
            arrays.extend(done)
            bar.update(len(done))

    try:
        for parts, data in items:
            names.append(parts)
            label = f"{source}: member {'/'.join(parts)}" if isinstance(data, bytes) else str(data)
            chunk.append((label, data))
            if len(chunk) >= _DECODE_CHUNK:
                pending.append(pool.submit(_decode_chunk, chunk, size, lim))
                chunk = []
                drain(2 * workers)
        if chunk:
            pending.append(pool.submit(_decode_chunk, chunk, size, lim))
        drain(0)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return names, arrays


def _assign_layout(names: list[tuple[str, ...]], source: Path) -> tuple[list[Optional[tuple[str, str]]], bool]:
    """Map each image path to ``(split, class)`` (split in train/test/all) or None (ignored).

    Returns the assignment and whether the tree has its own test split. One leading folder shared by every
    image (``cifar10-jpeg/train/...``) is skipped.
    """
    parts = names
    if (
        parts
        and all(len(p) >= 3 for p in parts)
        and len({p[0] for p in parts}) == 1
        and parts[0][0] not in ("train", "test", "val")
    ):
        parts = [p[1:] for p in parts]
    tops = {p[0] for p in parts if len(p) >= 3}
    assignment: list[Optional[tuple[str, str]]] = []
    if "train" in tops:
        test_dir = "test" if "test" in tops else ("val" if "val" in tops else None)
        for p in parts:
            if len(p) >= 3 and p[0] == "train":
                assignment.append(("train", p[1]))
            elif len(p) >= 3 and test_dir is not None and p[0] == test_dir:
                assignment.append(("test", p[1]))
            else:
                assignment.append(None)
        if test_dir is None:
            log.info(
                "%s: no test/ folder next to train/; holding out a fixed %.0f%% as test", source, 100 * TEST_FRACTION
            )
        elif test_dir == "val":
            log.info("%s: no test/ folder; using val/ as the test split", source)
        return assignment, test_dir is not None
    for p in parts:
        assignment.append(("all", p[0]) if len(p) >= 2 else None)
    return assignment, False


def load_image_folder_raw(cfg: DatasetConfig) -> RawDataset:
    """An ImageFolder tree (``train/<class>/*`` and ``test/<class>/*``, or just ``<class>/*``) from a
    directory or a tar archive; images are decoded with PIL, converted to RGB and optionally resized."""
    source = _root(cfg)
    t0 = time.perf_counter()
    if source.is_dir():
        listing = _iter_directory(source)
        names, arrays = _decode_all(listing, source, cfg.image_size, total=len(listing))
    else:
        names, arrays = _decode_all(_iter_archive(source, limits()), source, cfg.image_size, total=None)
    if not names:
        raise DatasetError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    assignment, has_test = _assign_layout(names, source)
    ignored = [n for n, a in zip(names, assignment) if a is None]
    if ignored:
        log.warning(
            "%s: ignoring %d images outside the class folders (e.g. %s)", source, len(ignored), "/".join(ignored[0])
        )
    train_classes = sorted({a[1] for a in assignment if a is not None and a[0] in ("train", "all")})
    if len(train_classes) < 2:
        raise DatasetError(
            f"{source}: found {len(train_classes)} class folder(s) {train_classes}; an image folder needs "
            "train/<class>/<image> and test/<class>/<image> (or <class>/<image>) with at least 2 classes"
        )
    test_only = sorted({a[1] for a in assignment if a is not None and a[0] == "test"} - set(train_classes))
    if test_only:
        raise DatasetError(f"{source}: test classes {test_only} have no training images")
    index = {c: i for i, c in enumerate(train_classes)}

    shapes = {}
    for n, a, arr in zip(names, assignment, arrays):
        if a is not None and arr.shape not in shapes:
            shapes[arr.shape] = "/".join(n)
    if len(shapes) > 1:
        (s1, n1), (s2, n2) = list(shapes.items())[:2]
        raise DatasetError(
            f"{source}: images have different sizes ({s1[1]}x{s1[0]} in {n1}, {s2[1]}x{s2[0]} in {n2}); "
            "set dataset.image_size to resize them all to one square size"
        )

    def stack(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = sorted(
            (a[1], names[i], i) for i, a in enumerate(assignment) if a is not None and a[0] == split
        )
        shape = next(iter(shapes))
        out = np.empty((len(rows), 3, shape[0], shape[1]), dtype=np.uint8)
        for j, (_, _, i) in enumerate(rows):
            out[j] = arrays[i].transpose(2, 0, 1)
        return out, np.array([index[c] for c, _, _ in rows], dtype=np.int64)

    if has_test:
        (trx, try_), (tex, tey) = stack("train"), stack("test")
    else:
        x, y = stack("train") if any(a is not None and a[0] == "train" for a in assignment) else stack("all")
        tr, te = stratified_split(y, TEST_FRACTION, TEST_SPLIT_SEED)
        trx, try_, tex, tey = x[tr], y[tr], x[te], y[te]
    log.info(
        "image_folder %s: %d train + %d test images, %d classes, %dx%d, decoded in %.1f s",
        source, len(try_), len(tey), len(train_classes), trx.shape[3], trx.shape[2], time.perf_counter() - t0,
    )
    return RawDataset(trx, try_, tex, tey, train_classes, str(cfg.root))


def check_image_folder_source(root: Path) -> Path:
    """Cheap checks that ``root`` is a directory with sub-folders or a readable tar archive."""
    hint = "expected a directory or a .tar/.tar.gz/.tgz/.tar.xz archive with train/<class>/* and test/<class>/*"
    if not root.exists():
        raise DatasetError(f"{root}: not found; {hint}")
    if root.is_dir():
        if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
            raise DatasetError(f"{root}: directory has no sub-folders; {hint}")
        return root
    if not _is_archive(root):
        raise DatasetError(f"{root}: not a directory or a tar archive (by its suffix); {hint}")
    try:
        with tarfile.open(root, "r:*") as tf:
            tf.next()
    except Exception as err:  # noqa: BLE001 - tarfile/lzma/gzip raise many kinds
        raise DatasetError(f"{root}: cannot open as a tar archive ({type(err).__name__}: {err}); {hint}") from None
    return root
