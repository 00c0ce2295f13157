"""Datasets: a registry of raw readers, the prepared uint8 cache, and the two batch loaders.

Flow: ``check_dataset_source(cfg)`` (cheap path/format checks, before any heavy work) ->
``prepare_dataset(cfg, seed)`` (read the raw set, hold out a stratified validation split, apply ``limit``,
compute per-channel statistics) -> ``save_prepared`` / ``load_prepared`` (one ``torch.save`` file of a plain
dict) -> ``make_loaders(...)``.

Splits:
- The *test* split never depends on ``params.seed``: it is the dataset's official test set, or (digits, an
  image folder without ``test/``) a stratified 20 % held out with the fixed seed :data:`TEST_SPLIT_SEED`.
- The *validation* split is a stratified ``val_fraction`` of the training set, drawn with ``seed``.
- ``limit`` keeps N training images (after the validation split), drawn with ``seed``; validation and test
  splits are untouched so scores stay comparable.

Loaders yield ``(x, y)``: ``x`` float, normalised ``(x / 255 - mean) / std``, on the target device; ``y``
int64. Both loaders draw every epoch's randomness (order, flips, crop offsets) up front from a CPU generator
seeded by ``(seed, epoch)`` (:func:`epoch_plan`), so the epoch-k batches are a function of (seed, k) alone,
identical for :class:`DeviceLoader` and :class:`TorchLoader`, on CPU and on CUDA. Augmentation (training
split only): ``x -> crop(pad_reflect(flip(x)))``, i.e. a random horizontal flip with probability 1/2, then
a random ``H x W`` crop of the image reflect-padded by ``crop_padding`` on each side.
With ``with_index=True`` a training loader yields ``(x, y, idx)``: ``idx`` (int64, on the target device) are
the batch's row numbers in the split, which a cached teacher (:mod:`gkd_core.distiller`) looks up.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import multiprocessing
import os
import struct
import tarfile
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from gkd_core.sections import DatasetConfig, TrainConfig
from gkd_core.io import torch_save

log = logging.getLogger(__name__)

PREPARED_FORMAT = "gkd-prepared-v1"
TEST_SPLIT_SEED = 20_170_828  # fixed: the test split never moves with params.seed
TEST_FRACTION = 0.2  # held out as test where a dataset has no official test split
_VAL_STREAM = 1  # SeedSequence stream ids, so the val split and `limit` draw independent numbers
_LIMIT_STREAM = 2
_EPOCH_STREAM = 3

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
_DECODE_CHUNK = 512

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_MAGIC_IMAGES = 0x00000803
IDX_MAGIC_LABELS = 0x00000801

_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", ["batches.meta", *[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]),
    "cifar100": ("cifar-100-python", ["meta", "train", "test"]),
}


class DatasetError(RuntimeError):
    """A dataset source is missing, has the wrong layout or is corrupt; the message names the file."""


# --- splits ---------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def stratified_split(
    labels: Any, fraction: float, seed: Union[int, np.random.Generator]
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)``, both sorted; ``len(held_out) == round(n * fraction)``.

    Each class contributes in proportion to its size (largest-remainder rounding, so the total is exact);
    within a class the held-out members are drawn with ``np.random.default_rng(seed)``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_held = int(math.floor(n * fraction + 0.5))
    if n_held <= 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_held * counts / n
    take = np.floor(exact).astype(np.int64)
    remainder = n_held - int(take.sum())
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask).astype(np.int64), held_idx


# --- raw datasets ---------------------------------------------------------------------------------------


@dataclass
class RawDataset:
    """What a registry reader returns: uint8 NCHW numpy arrays and int64 labels, before the val split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str


def _root(cfg: DatasetConfig) -> Path:
    if not cfg.root:
        raise DatasetError(f"dataset.root is required for dataset {cfg.name!r}")
    return Path(cfg.root).expanduser()


def load_digits_raw(cfg: DatasetConfig) -> RawDataset:
    """scikit-learn's 1797 8x8 digits (0..16 scaled to 0..255); a fixed stratified 20 % is the test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = digits.target.astype(np.int64)
    tr, te = stratified_split(y, TEST_FRACTION, TEST_SPLIT_SEED)
    return RawDataset(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)], "sklearn.datasets.load_digits")


# Fashion-MNIST (IDX files) ---------------------------------------------------------------------------


def _fashion_layout_hint() -> str:
    names = ", ".join(f"{f}.gz" for f in FASHION_FILES.values())
    return f"expected a directory holding {names} (or the same under <root>/FashionMNIST/raw/)"


def _find_fashion_files(root: Path) -> dict[str, Path]:
    if not root.exists():
        raise DatasetError(f"{root}: fashion_mnist directory not found; {_fashion_layout_hint()}")
    if not root.is_dir():
        raise DatasetError(f"{root}: fashion_mnist needs a directory, got a file; {_fashion_layout_hint()}")
    candidates = [root, root / "FashionMNIST" / "raw", root / "raw"]
    for folder in candidates:
        found = {}
        for key, stem in FASHION_FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(FASHION_FILES):
            return found

    def present(folder: Path, stem: str) -> bool:
        return (folder / f"{stem}.gz").is_file() or (folder / stem).is_file()

    best = max(candidates, key=lambda d: sum(present(d, s) for s in FASHION_FILES.values()))
    missing = [f"{s}.gz" for s in FASHION_FILES.values() if not present(best, s)]
    raise DatasetError(f"{best}: fashion_mnist files missing: {', '.join(missing)}; {_fashion_layout_hint()}")


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _check_idx_magic(path: Path, magic: int) -> None:
    try:
        with _open_maybe_gzip(path) as fh:
            head = fh.read(4)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path}: cannot read the IDX file ({err})") from None
    if len(head) < 4 or struct.unpack(">I", head)[0] != magic:
        got = f"0x{struct.unpack('>I', head)[0]:08x}" if len(head) == 4 else f"{len(head)} bytes"
        raise DatasetError(f"{path}: not an IDX {_idx_kind(magic)} file: magic {got}, expected 0x{magic:08x}")


def _idx_kind(magic: int) -> str:
    return "images" if magic == IDX_MAGIC_IMAGES else "labels"


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) of unsigned bytes; validate magic, dims and length."""
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as fh:
            buf = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot read the IDX file (corrupt or truncated: {err})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetError(f"{path}: truncated IDX file: {len(buf)} bytes, the header alone needs {header}")
    got = struct.unpack(">I", buf[:4])[0]
    if got != magic:
        raise DatasetError(
            f"{path}: not an IDX {_idx_kind(magic)} file: magic 0x{got:08x}, expected 0x{magic:08x}"
        )
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(buf) != expected:
        raise DatasetError(
            f"{path}: IDX size mismatch: {len(buf)} bytes, expected {expected} for dims {'x'.join(map(str, dims))}"
            f" ({'truncated' if len(buf) < expected else 'trailing bytes'})"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist_raw(cfg: DatasetConfig) -> RawDataset:
    """Fashion-MNIST from its four original IDX files (``.gz`` or extracted)."""
    files = _find_fashion_files(_root(cfg))
    parts = {}
    for split in ("train", "test"):
        img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
        x = read_idx(img_path, IDX_MAGIC_IMAGES)
        y = read_idx(lab_path, IDX_MAGIC_LABELS)
        if len(x) != len(y):
            raise DatasetError(f"{lab_path}: {len(y)} labels, but {img_path} holds {len(x)} images")
        if len(y) and int(y.max()) >= len(FASHION_CLASSES):
            raise DatasetError(f"{lab_path}: label {int(y.max())} out of range 0..{len(FASHION_CLASSES) - 1}")
        parts[split] = (x[:, None], y.astype(np.int64))
    if parts["train"][0].shape[1:] != parts["test"][0].shape[1:]:
        raise DatasetError(
            f"{files['test_images']}: image size {parts['test'][0].shape[2:]} differs from the training "
            f"images' {parts['train'][0].shape[2:]}"
        )
    (trx, try_), (tex, tey) = parts["train"], parts["test"]
    return RawDataset(trx, try_, tex, tey, list(FASHION_CLASSES), str(cfg.root))


# CIFAR-10/100 (torchvision, original pickle batches) ------------------------------------------------------


def _cifar_hint(name: str, root: Path) -> str:
    folder, files = _CIFAR_LAYOUT[name]
    return (
        f"{name} expects torchvision's original python format: {root}/{folder}/ with {', '.join(files)} "
        f"(set dataset.download: true to let torchvision fetch it into {root})"
    )


def _load_cifar(cfg: DatasetConfig, name: str) -> RawDataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    root = _root(cfg)
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise DatasetError(f"{root}: cannot load {name} ({err}); {_cifar_hint(name, root)}") from None

    def nchw(ds: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)

    (trx, try_), (tex, tey) = nchw(train), nchw(test)
    return RawDataset(trx, try_, tex, tey, list(train.classes), str(cfg.root))


def load_cifar10_raw(cfg: DatasetConfig) -> RawDataset:
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (original pickle batches under ``root``)."""
    return _load_cifar(cfg, "cifar10")


def load_cifar100_raw(cfg: DatasetConfig) -> RawDataset:
    """CIFAR-100 through ``torchvision.datasets.CIFAR100`` (original pickle batches under ``root``)."""
    return _load_cifar(cfg, "cifar100")


# Image folders (directory or tar archive) -----------------------------------------------------------------


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


def _iter_archive(path: Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """Yield ``(path parts, bytes)`` of the image members of a tar archive, in archive order (one pass)."""
    count = 0
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parts = _split_name(member.name)
                if not _is_image_name(parts):
                    continue
                fh = tf.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise EOFError(f"member {member.name} truncated ({len(data)} of {member.size} bytes)")
                count += 1
                yield parts, data
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as err:
        raise DatasetError(
            f"{path}: corrupt or truncated archive after {count} images ({type(err).__name__}: {err})"
        ) from None


def _iter_directory(path: Path) -> list[tuple[tuple[str, ...], Path]]:
    items = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(path).parts
        for name in sorted(filenames):
            parts = (*rel, name)
            if _is_image_name(parts):
                items.append((parts, Path(dirpath) / name))
    return items


def _decode_image(data: Union[bytes, Path], name: str, size: Optional[int]) -> np.ndarray:
    from PIL import Image

    try:
        if isinstance(data, Path):
            data = data.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a corrupt member
        raise DatasetError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def _decode_chunk(chunk: list[tuple[str, Union[bytes, Path]]], size: Optional[int]) -> list[np.ndarray]:
    return [_decode_image(data, name, size) for name, data in chunk]


def _decode_all(
    items: Iterable[tuple[tuple[str, ...], Union[bytes, Path]]],
    source: Path,
    size: Optional[int],
    total: Optional[int],
) -> tuple[list[tuple[str, ...]], list[np.ndarray]]:
    """Decode ``items`` in chunks on a thread pool while the caller's iterator keeps reading."""
    from PIL import Image
    from tqdm.auto import tqdm

    Image.init()  # register the format plugins once, before threads race to do it
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
                pending.append(pool.submit(_decode_chunk, chunk, size))
                chunk = []
                drain(2 * workers)
        if chunk:
            pending.append(pool.submit(_decode_chunk, chunk, size))
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
        names, arrays = _decode_all(_iter_archive(source), source, cfg.image_size, total=None)
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


DATASETS: dict[str, Callable[[DatasetConfig], RawDataset]] = {
    "digits": load_digits_raw,
    "fashion_mnist": load_fashion_mnist_raw,
    "cifar10": load_cifar10_raw,
    "cifar100": load_cifar100_raw,
    "image_folder": load_image_folder_raw,
}


def check_dataset_source(cfg: DatasetConfig) -> Optional[Path]:
    """Cheap checks that the configured source exists and has the right shape; raises :class:`DatasetError`
    with one clear message. Returns the source path (None for the embedded digits)."""
    if cfg.name not in DATASETS:
        raise DatasetError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(DATASETS))}")
    if cfg.name == "digits":
        return None
    root = _root(cfg)
    if cfg.name == "fashion_mnist":
        files = _find_fashion_files(root)
        for key, path in files.items():
            _check_idx_magic(path, IDX_MAGIC_IMAGES if key.endswith("images") else IDX_MAGIC_LABELS)
        return root
    if cfg.name in _CIFAR_LAYOUT:
        if cfg.download:
            if root.exists() and not root.is_dir():
                raise DatasetError(f"{root}: exists and is not a directory; {_cifar_hint(cfg.name, root)}")
            return root
        folder, expected = _CIFAR_LAYOUT[cfg.name]
        if not root.is_dir():
            raise DatasetError(f"{root}: directory not found; {_cifar_hint(cfg.name, root)}")
        missing = [f for f in expected if not (root / folder / f).is_file()]
        if missing:
            raise DatasetError(f"{root / folder}: missing {', '.join(missing)}; {_cifar_hint(cfg.name, root)}")
        return root
    # image_folder
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


# --- prepared data ---------------------------------------------------------------------------------------

_TENSOR_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


@dataclass(repr=False)
class PreparedData:
    """The prepared dataset: uint8 NCHW images and int64 labels per split, per-channel mean/std (float32,
    from the training split, on the [0, 1] scale), class names and metadata (JSON-friendly)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = None
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
                raise DatasetError(f"PreparedData.{split}_x must be a uint8 NCHW tensor, got {_describe(x)}")
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DatasetError(
                    f"PreparedData.{split}_y must be int64 of shape ({x.shape[0]},), got {_describe(y)}"
                )
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise DatasetError(
                    f"PreparedData.{split}_x has images of shape {tuple(x.shape[1:])}, train has {shape}"
                )
            shape = tuple(x.shape[1:])
        for name in ("mean", "std"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.shape != (shape[0],):
                raise DatasetError(f"PreparedData.{name} must have shape ({shape[0]},), got {_describe(t)}")

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def image_size(self) -> int:
        """Image height (equal to the width for every built-in dataset; see :attr:`image_hw`)."""
        return int(self.train_x.shape[2])

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in _TENSOR_KEYS)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def content_hash(self) -> str:
        """sha256 over the tensors' bytes, shapes and the class names."""
        h = hashlib.sha256()
        for k in (*_TENSOR_KEYS, "mean", "std"):
            t = getattr(self, k).contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": PREPARED_FORMAT}
        for k in (*_TENSOR_KEYS, "mean", "std"):
            out[k] = getattr(self, k)
        out["classes"] = list(self.classes)
        out["meta"] = dict(self.meta)
        return out

    def __repr__(self) -> str:
        c, h, w = self.train_x.shape[1:]
        return (
            f"PreparedData({self.meta.get('name', '?')}: train={len(self.train_y)} val={len(self.val_y)} "
            f"test={len(self.test_y)}, {c}x{h}x{w}, {self.num_classes} classes)"
        )


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and (population) std of uint8 NCHW images on the [0, 1] scale (float32)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum().clamp_min(1.0)
        mean = (counts * levels).sum() / n
        var = (counts * (levels - mean) ** 2).sum() / n
        means.append(mean)
        stds.append(var.sqrt())
    mean_t = torch.stack(means).to(torch.float32)
    std_t = torch.stack(stds).to(torch.float32)
    if bool((std_t < 1e-6).any()):
        log.warning("constant channel(s) in the training images; using std 1.0 there")
        std_t = torch.where(std_t < 1e-6, torch.ones_like(std_t), std_t)
    return mean_t, std_t


def prepare_dataset(cfg: DatasetConfig, seed: int = 0) -> PreparedData:
    """Read the configured dataset, split off validation (stratified, seeded), apply ``limit``, compute stats."""
    check_dataset_source(cfg)
    t0 = time.perf_counter()
    if cfg.image_size is not None and cfg.name != "image_folder":
        log.warning("dataset.image_size is only used by image_folder; ignored for %s", cfg.name)
    raw = DATASETS[cfg.name](cfg)
    n_source = len(raw.train_y)
    tr, va = stratified_split(raw.train_y, cfg.val_fraction, _rng(seed, _VAL_STREAM))
    if cfg.limit is not None and cfg.limit < len(tr):
        keep = _rng(seed, _LIMIT_STREAM).permutation(len(tr))[: cfg.limit]
        tr = tr[np.sort(keep)]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    train_x = tensor(raw.train_x[tr])
    mean, std = channel_stats(train_x)
    data = PreparedData(
        train_x=train_x,
        train_y=tensor(raw.train_y[tr]),
        val_x=tensor(raw.train_x[va]),
        val_y=tensor(raw.train_y[va]),
        test_x=tensor(np.array(raw.test_x, copy=True)),
        test_y=tensor(np.array(raw.test_y, dtype=np.int64, copy=True)),
        mean=mean,
        std=std,
        classes=list(raw.classes),
    )
    data.meta = {
        "format": PREPARED_FORMAT,
        "name": cfg.name,
        "source": raw.source,
        "seed": int(seed),
        "val_fraction": float(cfg.val_fraction),
        "limit": cfg.limit,
        "image_size": cfg.image_size,
        "shape": list(data.train_x.shape[1:]),
        "num_classes": data.num_classes,
        "sizes": {
            "train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y), "source_train": n_source,
        },
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "sha256": data.content_hash(),
    }
    log.info(
        "prepared %s: train %d, val %d, test %d, %s, %d classes in %.1f s",
        cfg.name, len(data.train_y), len(data.val_y), len(data.test_y),
        "x".join(map(str, data.train_x.shape[1:])), data.num_classes, time.perf_counter() - t0,
    )
    return data


def save_prepared(data: PreparedData, path: str | os.PathLike) -> None:
    """Write the prepared data as one ``torch.save`` file of a plain dict (atomically)."""
    torch_save(data.to_dict(), path)


def load_prepared(path: str | os.PathLike, verify: bool = True) -> PreparedData:
    """Read a file written by :func:`save_prepared`; ``verify`` re-checks the content hash."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: prepared dataset not found (run the prepare stage first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds on a bad file
        raise DatasetError(f"{path}: not a readable prepared dataset ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or obj.get("format") != PREPARED_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DatasetError(f"{path}: not a prepared dataset of format {PREPARED_FORMAT} (found {got!r})")
    missing = [k for k in (*_TENSOR_KEYS, "mean", "std", "classes", "meta") if k not in obj]
    if missing:
        raise DatasetError(f"{path}: prepared dataset lacks {', '.join(missing)}")
    try:
        data = PreparedData(**{k: obj[k] for k in (*_TENSOR_KEYS, "mean", "std", "classes", "meta")})
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    if verify and data.meta.get("sha256") and data.content_hash() != data.meta["sha256"]:
        raise DatasetError(f"{path}: content hash mismatch (file corrupt or edited); re-run the prepare stage")
    return data


# --- loaders ---------------------------------------------------------------------------------------------


def epoch_plan(
    n: int, seed: int, epoch: int, shuffle: bool, flip: bool, crop_padding: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The randomness of one epoch, from a CPU generator seeded by ``(seed, epoch)``.

    Returns ``(order, flips, offsets)``: the sample order (int64, ``n``), per-position flip flags (bool) or
    None, per-position crop offsets ``(n, 2)`` (row, col) in ``[0, 2 * crop_padding]`` or None.
    """
    state = np.random.SeedSequence([int(seed), int(epoch), _EPOCH_STREAM]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(state))
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    flips = torch.rand(n, generator=g) < 0.5 if flip else None
    offsets = torch.randint(0, 2 * crop_padding + 1, (n, 2), generator=g) if crop_padding > 0 else None
    return order, flips, offsets


def normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in float32; ``mean``/``std`` shaped ``(1, C, 1, 1)``."""
    return (x_uint8.to(torch.float32) / 255.0 - mean) / std


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map padded coordinates in ``[-(n-1), 2n-2]`` onto ``[0, n-1]`` like reflect padding (edge not repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def batch_augment(
    x: torch.Tensor, flips: Optional[torch.Tensor], offsets: Optional[torch.Tensor], padding: int
) -> torch.Tensor:
    """Flip, reflect-pad and crop a whole batch with one gather (any dtype, any device).

    Sample b becomes ``pad_reflect(flip_b(x[b]), padding)[:, r:r+H, c:c+W]`` with ``(r, c) = offsets[b]``
    and ``flip_b`` a horizontal flip where ``flips[b]``. The padding is never materialised: the source pixel
    of every output pixel is computed (reflected coordinates) and gathered.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(b, h)
    cols = torch.arange(w, device=x.device).expand(b, w)
    if offsets is not None and padding > 0:
        rows = _reflect(rows + (offsets[:, 0:1] - padding), h)
        cols = _reflect(cols + (offsets[:, 1:2] - padding), w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    pix = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, pix).view(b, c, h, w)


def _check_split(x: torch.Tensor, y: torch.Tensor, batch_size: int, augment: bool, crop_padding: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"x must be a uint8 NCHW tensor, got {_describe(x)}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {_describe(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if augment and crop_padding > 0 and crop_padding >= min(x.shape[2], x.shape[3]):
        raise ValueError(
            f"train.crop_padding = {crop_padding}: reflect padding needs it smaller than the image size "
            f"{x.shape[2]}x{x.shape[3]}"
        )


def _seed_of(seed: Union[int, torch.Generator]) -> int:
    return int(seed.initial_seed()) if isinstance(seed, torch.Generator) else int(seed)


class _EpochState:
    """The epoch counter both loaders share: ``epoch`` is the epoch the next ``iter()`` will use."""

    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            log.warning("loader state saved with seed %s, this loader has seed %s", state["seed"], self.seed)
        self.epoch = int(state["epoch"])

    def close(self) -> None:
        """Release what iteration holds beyond the data (worker processes); the loader stays usable."""


class DeviceLoader(_EpochState):
    """The whole split on ``device`` as uint8; per batch: select rows, flip + crop (:func:`batch_augment`, one
    gather on the uint8 batch, which equals doing it after normalising: it only moves values), normalise.

    Epoch k (the counter advances when iteration starts; see :meth:`set_epoch`, :meth:`state_dict`) uses
    :func:`epoch_plan` ``(seed, k)``. ``len()`` is the number of batches. ``with_index`` adds the batch's row
    numbers as a third element.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        drop_last: bool = False,
        device: Union[str, torch.device] = "cpu",
        seed: Union[int, torch.Generator] = 0,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        with_index: bool = False,
    ):
        _check_split(x_uint8, y, batch_size, augment, crop_padding)
        self.device = torch.device(device)
        self.with_index = bool(with_index)
        self.x = x_uint8.to(self.device)
        self.y = y.to(self.device, torch.int64)
        c = x_uint8.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1).to(self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, c, 1, 1).to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.crop_padding = int(crop_padding) if augment else 0
        self.hflip = bool(hflip) and bool(augment)
        self.drop_last = bool(drop_last)
        self.seed = _seed_of(seed)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        self.epoch += 1
        n = self.num_samples
        order, flips, offsets = epoch_plan(n, self.seed, epoch, self.shuffle, self.hflip, self.crop_padding)
        order = order.to(self.device)
        flips = flips.to(self.device) if flips is not None else None
        offsets = offsets.to(self.device) if offsets is not None else None
        return self._batches(order, flips, offsets)

    def _batches(
        self, order: torch.Tensor, flips: Optional[torch.Tensor], offsets: Optional[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            xb = self.x.index_select(0, idx)
            if flips is not None or offsets is not None:
                xb = batch_augment(
                    xb,
                    flips[sl] if flips is not None else None,
                    offsets[sl] if offsets is not None else None,
                    self.crop_padding,
                )
            xb = normalise(xb, self.mean, self.std)
            if self.dtype != torch.float32:
                xb = xb.to(self.dtype)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = self.y.index_select(0, idx)
            yield (xb, yb, idx) if self.with_index else (xb, yb)


class _PlannedUint8(Dataset):
    """Per-sample view of uint8 images; an item key ``(index, flip, row, col)`` carries the augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, crop_padding: int, with_index: bool = False):
        self.x, self.y, self.pad, self.with_index = x, y, crop_padding, with_index

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, key: tuple[int, bool, int, int]) -> tuple[Any, ...]:
        i, flip, r, c = key
        img = self.x[i]
        if flip:
            img = img.flip(-1)
        if self.pad:
            h, w = img.shape[1:]
            img = F.pad(img[None], (self.pad,) * 4, mode="reflect")[0, :, r : r + h, c : c + w]
        return (img.contiguous(), self.y[i], i) if self.with_index else (img.contiguous(), self.y[i])


class _PlannedBatchSampler(Sampler):
    """Yields batches of item keys following :func:`epoch_plan` for the epoch set by the owning loader."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, shuffle: bool, hflip: bool, pad: int):
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.seed, self.shuffle, self.hflip, self.pad = seed, shuffle, hflip, pad
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool, int, int]]]:
        order, flips, offsets = epoch_plan(self.n, self.seed, self.epoch, self.shuffle, self.hflip, self.pad)
        o = order.tolist()
        f = flips.tolist() if flips is not None else [False] * self.n
        rc = offsets.tolist() if offsets is not None else [(0, 0)] * self.n
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.n)
            yield [(o[j], f[j], rc[j][0], rc[j][1]) for j in range(lo, hi)]


def _worker_context(num_workers: int) -> Optional[str]:
    """Start DataLoader workers from a clean forkserver, not by forking the caller.

    A forked worker inherits the parent's threads and fork handlers: in a process that has run a Prefect flow
    such workers die with exit code 1 when they are shut down, and the DataLoader then raises. The
    forkserver starts from a fresh interpreter and preloads this module (so torch: ~1.7 s once per process);
    each worker still imports the caller's main module once, as with ``spawn``. The uint8 tensors reach the
    workers through shared memory, once, since the workers are persistent.
    """
    if num_workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    multiprocessing.set_forkserver_preload(["__main__", __name__])  # takes effect when the forkserver first starts
    return "forkserver"


class TorchLoader(_EpochState):
    """The ordinary ``torch.utils.data.DataLoader`` path, batch-for-batch identical to :class:`DeviceLoader`.

    Workers flip/crop uint8 samples (the per-epoch plan comes from the sampler in the main process, so worker
    seeding does not matter); batches are moved to ``device`` (pinned memory on CUDA) and normalised there.
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        drop_last: bool = False,
        device: Union[str, torch.device] = "cpu",
        seed: Union[int, torch.Generator] = 0,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        num_workers: int = 0,
        with_index: bool = False,
    ):
        _check_split(x_uint8, y, batch_size, augment, crop_padding)
        self.device = torch.device(device)
        self.with_index = bool(with_index)
        c = x_uint8.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, c, 1, 1).to(self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, c, 1, 1).to(self.device)
        self.batch_size = int(batch_size)
        self.seed = _seed_of(seed)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.epoch = 0
        pad = int(crop_padding) if augment else 0
        self._n = int(x_uint8.shape[0])
        self._sampler = _PlannedBatchSampler(
            self._n, self.batch_size, bool(drop_last), self.seed, bool(shuffle), bool(hflip) and bool(augment), pad
        )
        self._loader = DataLoader(
            _PlannedUint8(x_uint8.cpu(), y.cpu().to(torch.int64), pad, self.with_index),
            batch_sampler=self._sampler,
            num_workers=int(num_workers),
            pin_memory=self.device.type == "cuda",
            persistent_workers=int(num_workers) > 0,
            generator=torch.Generator().manual_seed(self.seed),
            multiprocessing_context=_worker_context(int(num_workers)),
        )

    @property
    def num_samples(self) -> int:
        return self._n

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._sampler.epoch = self.epoch
        self.epoch += 1
        batches = iter(self._loader)  # the sampler's plan is drawn here, for the epoch just set
        return self._batches(batches)

    def close(self) -> None:
        """Shut the persistent worker processes down now rather than when the loader is garbage-collected
        (a worker that failed surfaces here as the DataLoader's RuntimeError). The next ``iter()`` restarts them."""
        it, self._loader._iterator = self._loader._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _batches(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, ...]]:
        non_blocking = self.device.type == "cuda"
        for xb, yb, *rest in batches:
            xb = normalise(xb.to(self.device, non_blocking=non_blocking), self.mean, self.std)
            if self.dtype != torch.float32:
                xb = xb.to(self.dtype)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = yb.to(self.device, non_blocking=non_blocking)
            yield (xb, yb, rest[0].to(self.device, non_blocking=non_blocking)) if rest else (xb, yb)


Loader = Union[DeviceLoader, TorchLoader]


def choose_loader(data: PreparedData, runtime_loader: str, device: Union[str, torch.device]) -> str:
    """``device`` or ``torch``: ``auto`` picks ``device`` on CPU/MPS, and on CUDA when the uint8 splits take
    less than 25 % of the free device memory."""
    if runtime_loader not in ("auto", "device", "torch"):
        raise ValueError(f"runtime.loader must be auto, device or torch, got {runtime_loader!r}")
    if runtime_loader != "auto":
        return runtime_loader
    device = torch.device(device)
    if device.type != "cuda":
        return "device"
    free, _total = torch.cuda.mem_get_info(device)
    kind = "device" if data.nbytes < 0.25 * free else "torch"
    log.info(
        "loader auto: %.1f MB of uint8 data, %.1f GB free on %s -> %s", data.nbytes / 2**20, free / 2**30, device, kind
    )
    return kind


def make_loaders(
    data: PreparedData,
    train_cfg: TrainConfig,
    runtime_loader: str = "auto",
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    with_index: bool = False,
) -> tuple[Loader, Loader, Loader]:
    """``(train, val, test)`` loaders. Train: shuffled, augmented per ``train_cfg`` (augment, crop_padding,
    hflip), ``drop_last`` when it holds at least one full batch, yielding ``(x, y, idx)`` with ``with_index``.
    Val/test: in order, not augmented, ``(x, y)``."""
    kind = choose_loader(data, runtime_loader, device)
    common: dict[str, Any] = dict(
        mean=data.mean, std=data.std, batch_size=train_cfg.batch_size, device=device, seed=seed,
        dtype=dtype, channels_last=channels_last,
    )
    if kind == "torch":
        common["num_workers"] = num_workers
    cls = DeviceLoader if kind == "device" else TorchLoader
    train = cls(
        data.train_x, data.train_y, shuffle=True, augment=train_cfg.augment, crop_padding=train_cfg.crop_padding,
        hflip=train_cfg.hflip, drop_last=len(data.train_y) >= train_cfg.batch_size, with_index=with_index,
        **common,
    )
    val = cls(data.val_x, data.val_y, shuffle=False, augment=False, drop_last=False, **common)
    test = cls(data.test_x, data.test_y, shuffle=False, augment=False, drop_last=False, **common)
    log.info("loaders: %s on %s, %d/%d/%d batches (train/val/test)", kind, device, len(train), len(val), len(test))
    return train, val, test
