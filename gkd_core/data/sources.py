"""Dataset sources: the registry of raw readers and the cheap checks run before any heavy work.

``check_dataset_source(cfg)`` checks paths and formats (one clear :class:`DatasetError` naming the file);
``DATASETS[cfg.name](cfg)`` reads the raw set as a :class:`RawDataset` (uint8 NCHW numpy arrays, int64
labels, before the validation split). Readers: scikit-learn's digits, Fashion-MNIST from its IDX files,
CIFAR-10/100 through torchvision, and image folders or tar archives (:mod:`gkd_core.data.image_folder`).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from gkd_core.sections import DatasetConfig
from gkd_core.data.image_folder import check_image_folder_source, load_image_folder_raw
from gkd_core.data.raw import TEST_FRACTION, TEST_SPLIT_SEED, DatasetError, RawDataset, _root, stratified_split

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


def load_digits_raw(cfg: DatasetConfig) -> RawDataset:
    """scikit-learn's 1797 8x8 digits (0..16 scaled to 0..255); a fixed stratified 20 % is the test split."""
    from sklearn.datasets import load_digits  # lazy: sklearn takes seconds to import

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
    from torchvision.datasets import CIFAR10, CIFAR100  # lazy: torchvision takes seconds to import

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


# The registry ----------------------------------------------------------------------------------------------

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
    return check_image_folder_source(root)  # image_folder

