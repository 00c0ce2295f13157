"""gkd_core.data: dataset readers, splits, the prepared cache and the two loaders."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gkd_core.config import DatasetConfig, TrainConfig
from gkd_core.data import (
    DATASETS,
    FASHION_CLASSES,
    IDX_MAGIC_IMAGES,
    IDX_MAGIC_LABELS,
    DatasetError,
    DeviceLoader,
    PreparedData,
    TorchLoader,
    channel_stats,
    check_dataset_source,
    load_prepared,
    make_loaders,
    prepare_dataset,
    read_idx,
    save_prepared,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
FASHION_DIR = SHARED_DATA / "fashion-mnist"
CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg" / "cifar10-jpeg.tar.xz"


# --- helpers --------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def unique_images(n: int, size: int = 28, offset: int = 0) -> np.ndarray:
    """Images whose first two pixels encode their index, so rows can be traced through the splits."""
    rng = np.random.default_rng(n + offset)
    x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    ids = np.arange(n) + offset
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    return x


def image_ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist())


def write_fashion(root: Path, n_train: int = 50, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    xtr, xte = unique_images(n_train), unique_images(n_test, offset=1000)
    ytr, yte = np.arange(n_train) % 10, np.arange(n_test) % 10
    for name, arr, magic in [
        ("train-images-idx3-ubyte", xtr, IDX_MAGIC_IMAGES),
        ("train-labels-idx1-ubyte", ytr, IDX_MAGIC_LABELS),
        ("t10k-images-idx3-ubyte", xte, IDX_MAGIC_IMAGES),
        ("t10k-labels-idx1-ubyte", yte, IDX_MAGIC_LABELS),
    ]:
        with gzip.open(root / f"{name}.gz", "wb") as fh:
            fh.write(idx_bytes(arr, magic))
    return xtr, ytr


def colour(cls: int, i: int) -> tuple[int, int, int]:
    return (40 * cls + 10, 7 * i, 200 - 30 * cls)


def png_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (6, 6), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    img = Image.new("RGB", size, rgb)
    img.putpixel((0, 0), (255, 255, 255))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def folder_members(top: str = "toy", split: bool = True, n: int = 5) -> dict[str, bytes]:
    """``{member path: bytes}`` for a 2-class tree (zebra, ant: to check the classes are sorted)."""
    members = {}
    for cls_i, cls in enumerate(["ant", "zebra"]):
        for i in range(n):
            name = f"{cls}/{i:03d}.png"
            data = png_bytes(colour(cls_i, i), mode="L" if (cls_i, i) == (1, 0) else "RGB")
            members[f"{top}/train/{name}" if split else f"{top}/{name}"] = data
            if split and i < 2:
                members[f"{top}/test/{cls}/t{i}.jpg"] = png_bytes(colour(cls_i, i), fmt="JPEG")
    members[f"{top}/README.txt"] = b"not an image"
    return {k.lstrip("/"): v for k, v in members.items()}


def write_tar(path: Path, members: dict[str, bytes], mode: str) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def cfg(**kw) -> DatasetConfig:
    return DatasetConfig(**kw)


@pytest.fixture(scope="module")
def digits() -> PreparedData:
    return prepare_dataset(cfg(), seed=0)


# --- splits and digits ----------------------------------------------------------------------------------


def test_registry_names_match_config():
    from gkd_core.config import DATASET_NAMES

    assert set(DATASETS) == set(DATASET_NAMES)


def test_stratified_split_exact_disjoint_and_proportional():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    kept, held = stratified_split(labels, 0.2, seed=3)
    assert len(held) == 20 and len(kept) == 80
    assert set(kept).isdisjoint(held) and set(kept) | set(held) == set(range(100))
    assert np.bincount(labels[held]).tolist() == [10, 6, 3, 1]
    again = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(held, again[1])
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=4)[1])
    assert len(stratified_split(labels, 0.0, seed=0)[1]) == 0


def test_digits_shapes_range_and_stats(digits):
    total = len(digits.train_y) + len(digits.val_y) + len(digits.test_y)
    assert total == 1797
    assert len(digits.test_y) == 359  # round(0.2 * 1797), fixed
    assert len(digits.val_y) == round(0.1 * (1797 - 359))
    for x, y in (digits.split(s) for s in ("train", "val", "test")):
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    assert int(digits.train_x.max()) == 255 and int(digits.train_x.min()) == 0
    assert set(np.unique(digits.train_x.numpy())) <= {round(v * 255 / 16) for v in range(17)}
    assert digits.classes == [str(i) for i in range(10)]
    assert (digits.in_channels, digits.num_classes, digits.image_size) == (1, 10, 8)
    assert set(digits.train_y.tolist()) == set(range(10)) and set(digits.val_y.tolist()) == set(range(10))
    ref = digits.train_x.double() / 255
    assert digits.mean.dtype == torch.float32 and digits.mean.shape == (1,)
    assert torch.allclose(digits.mean.double(), ref.mean().reshape(1), atol=1e-6)
    assert torch.allclose(digits.std.double(), ref.std(unbiased=False).reshape(1), atol=1e-6)
    assert digits.meta["name"] == "digits" and digits.meta["sizes"]["val"] == len(digits.val_y)
    assert digits.meta["sha256"] == digits.content_hash()


def test_digits_split_determinism(digits):
    same = prepare_dataset(cfg(), seed=0)
    other = prepare_dataset(cfg(), seed=1)
    assert same.meta["sha256"] == digits.meta["sha256"]
    assert torch.equal(same.val_x, digits.val_x) and torch.equal(same.train_y, digits.train_y)
    assert torch.equal(other.test_x, digits.test_x) and torch.equal(other.test_y, digits.test_y)  # test never moves
    assert not torch.equal(other.val_x, digits.val_x)
    assert len(other.val_y) == len(digits.val_y)


def test_limit_keeps_n_training_images(digits):
    small = prepare_dataset(cfg(limit=100), seed=0)
    assert len(small.train_y) == 100
    assert torch.equal(small.val_x, digits.val_x) and torch.equal(small.test_x, digits.test_x)
    assert small.meta["limit"] == 100 and small.meta["sizes"]["train"] == 100


# --- fashion-mnist --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_idx_files(tmp_path, layout):
    root = tmp_path / "fm"
    xtr, ytr = write_fashion(root if layout == "flat" else root / "FashionMNIST" / "raw")
    data = prepare_dataset(cfg(name="fashion_mnist", root=str(root), val_fraction=0.2), seed=0)
    assert data.train_x.shape == (40, 1, 28, 28) and data.val_x.shape == (10, 1, 28, 28)
    assert data.test_x.shape == (20, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.classes == FASHION_CLASSES and data.num_classes == 10
    train_ids, val_ids = image_ids(data.train_x), image_ids(data.val_x)
    assert train_ids.isdisjoint(val_ids) and train_ids | val_ids == set(range(50))
    assert image_ids(data.test_x) == set(range(1000, 1020))
    # every image arrives unchanged with its own label
    for x, y in zip(data.val_x, data.val_y):
        i = int(x[0, 0, 0]) * 256 + int(x[0, 0, 1])
        assert np.array_equal(x[0].numpy(), xtr[i]) and int(y) == ytr[i]


def test_real_fashion_mnist():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not present at {FASHION_DIR}")
    t0 = time.perf_counter()
    data = prepare_dataset(cfg(name="fashion_mnist", root=str(FASHION_DIR), val_fraction=0.1), seed=0)
    assert time.perf_counter() - t0 < 15
    assert len(data.train_y) == 54000 and len(data.val_y) == 6000 and len(data.test_y) == 10000
    assert data.train_x.shape[1:] == (1, 28, 28) and data.num_classes == 10
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert torch.bincount(data.val_y).tolist() == [600] * 10
    assert abs(float(data.mean) - 0.286) < 0.002


def test_idx_bad_magic(tmp_path):
    root = tmp_path / "fm"
    write_fashion(root)
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(idx_bytes(np.zeros(50, np.uint8), IDX_MAGIC_IMAGES & 0xFFFFFF00 | 0x02))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz.*magic 0x00000802, expected 0x00000801"):
        check_dataset_source(cfg(name="fashion_mnist", root=str(root)))
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        prepare_dataset(cfg(name="fashion_mnist", root=str(root)), seed=0)


def test_idx_truncated_payload_and_stream(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(idx_bytes(unique_images(5), IDX_MAGIC_IMAGES)[:-100])
    msg = r"t10k-images-idx3-ubyte\.gz: IDX size mismatch: 3836 bytes, expected 3936.*truncated"
    with pytest.raises(DatasetError, match=msg):
        read_idx(path, IDX_MAGIC_IMAGES)
    full = tmp_path / "full.gz"
    with gzip.open(full, "wb") as fh:
        fh.write(idx_bytes(unique_images(5), IDX_MAGIC_IMAGES))
    cut = tmp_path / "cut-idx3-ubyte.gz"
    cut.write_bytes(full.read_bytes()[:-40])  # gzip stream cut short
    with pytest.raises(DatasetError, match=r"cut-idx3-ubyte\.gz: cannot read"):
        read_idx(cut, IDX_MAGIC_IMAGES)
    raw = tmp_path / "plain-idx3-ubyte"  # uncompressed IDX also parses
    raw.write_bytes(idx_bytes(unique_images(3), IDX_MAGIC_IMAGES))
    assert read_idx(raw, IDX_MAGIC_IMAGES).shape == (3, 28, 28)


def test_fashion_missing_file_and_dir(tmp_path):
    root = tmp_path / "fm"
    write_fashion(root)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing: t10k-labels-idx1-ubyte\.gz"):
        check_dataset_source(cfg(name="fashion_mnist", root=str(root)))
    with pytest.raises(DatasetError, match=r"nowhere: fashion_mnist directory not found"):
        check_dataset_source(cfg(name="fashion_mnist", root=str(tmp_path / "nowhere")))


# --- image folders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,suffix", [("w:gz", "toy.tar.gz"), ("w:xz", "toy.tar.xz"), ("w", "toy.tar")])
def test_image_folder_archive_with_top_folder(tmp_path, mode, suffix):
    archive = write_tar(tmp_path / suffix, folder_members(), mode)
    check_dataset_source(cfg(name="image_folder", root=str(archive)))
    data = prepare_dataset(cfg(name="image_folder", root=str(archive), val_fraction=0.2), seed=0)
    assert data.classes == ["ant", "zebra"]
    assert data.train_x.shape == (8, 3, 6, 6) and data.val_x.shape == (2, 3, 6, 6)
    assert data.test_x.shape == (4, 3, 6, 6) and data.test_y.tolist() == [0, 0, 1, 1]
    # PNG is lossless: each training image is its class colour (with a white corner), in RGB
    seen = []
    for x, y in zip(torch.cat([data.train_x, data.val_x]), torch.cat([data.train_y, data.val_y])):
        assert x[:, 0, 0].tolist() == [255, 255, 255]
        r, g, b = x[:, 3, 3].tolist()
        seen.append((int(y), r, g, b))
    expected = {(c, *colour(c, i)) for c in (0, 1) for i in range(5)} - {(1, *colour(1, 0))}
    grey = [t for t in seen if t[1] == t[2] == t[3]]  # zebra/000.png was stored as grayscale ("L")
    assert len(grey) == 1 and grey[0][0] == 1
    assert set(seen) - set(grey) == expected


def test_image_folder_directory_single_tree_and_resize(tmp_path):
    root = write_tree(tmp_path / "tree", folder_members(top="", split=False, n=10))
    data = prepare_dataset(cfg(name="image_folder", root=str(root), val_fraction=0.25, image_size=12), seed=0)
    assert data.classes == ["ant", "zebra"]
    assert len(data.test_y) == 4 and data.test_y.tolist() == [0, 0, 1, 1]  # fixed 20 % hold-out
    assert len(data.train_y) + len(data.val_y) == 16 and len(data.val_y) == 4
    assert data.train_x.shape[1:] == (3, 12, 12) and data.image_size == 12
    again = prepare_dataset(cfg(name="image_folder", root=str(root), val_fraction=0.25, image_size=12), seed=5)
    assert torch.equal(again.test_x, data.test_x)


def test_image_folder_same_content_from_directory_and_archive(tmp_path):
    members = folder_members()
    archive = write_tar(tmp_path / "a.tgz", members, "w:gz")
    tree = write_tree(tmp_path / "d", members) / "toy"
    a = prepare_dataset(cfg(name="image_folder", root=str(archive)), seed=0)
    b = prepare_dataset(cfg(name="image_folder", root=str(tree)), seed=0)
    assert a.meta["sha256"] == b.meta["sha256"]


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    members = folder_members()
    members["toy/train/ant/big.png"] = png_bytes((1, 2, 3), size=(9, 7))
    archive = write_tar(tmp_path / "mixed.tar", members, "w")
    with pytest.raises(DatasetError, match="different sizes.*dataset.image_size"):
        prepare_dataset(cfg(name="image_folder", root=str(archive)), seed=0)
    data = prepare_dataset(cfg(name="image_folder", root=str(archive), image_size=8), seed=0)
    assert data.image_hw == (8, 8)


def test_image_folder_corrupt_member(tmp_path):
    members = folder_members()
    members["toy/train/zebra/004.png"] = members["toy/train/zebra/004.png"][:30]
    archive = write_tar(tmp_path / "bad.tar.gz", members, "w:gz")
    with pytest.raises(DatasetError, match=r"bad\.tar\.gz: member toy/train/zebra/004\.png: cannot decode"):
        prepare_dataset(cfg(name="image_folder", root=str(archive)), seed=0)


def test_image_folder_truncated_archive(tmp_path):
    archive = write_tar(tmp_path / "cut.tar.xz", folder_members(n=40), "w:xz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cut\.tar\.xz: corrupt or truncated archive"):
        prepare_dataset(cfg(name="image_folder", root=str(archive)), seed=0)


def test_image_folder_bad_sources(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.tar\.xz: not found"):
        check_dataset_source(cfg(name="image_folder", root=str(tmp_path / "missing.tar.xz")))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DatasetError, match=r"notes\.txt: not a directory or a tar archive"):
        check_dataset_source(cfg(name="image_folder", root=str(text)))
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match=r"fake\.tar\.gz: cannot open as a tar archive"):
        check_dataset_source(cfg(name="image_folder", root=str(fake)))
    one = write_tree(tmp_path / "one", {"cat/a.png": png_bytes((1, 2, 3))})
    with pytest.raises(DatasetError, match="at least 2 classes"):
        prepare_dataset(cfg(name="image_folder", root=str(one)), seed=0)


def test_cifar_missing_explains_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py.*download: true"):
        check_dataset_source(cfg(name="cifar10", root=str(tmp_path)))
    with pytest.raises(DatasetError, match=r"cifar-100-python.*download: true"):
        prepare_dataset(cfg(name="cifar100", root=str(tmp_path / "none")), seed=0)


@pytest.mark.slow
def test_real_cifar10_jpeg_archive():
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive not present at {CIFAR_JPEG}")
    data = prepare_dataset(cfg(name="image_folder", root=str(CIFAR_JPEG), val_fraction=0.1), seed=0)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (45000, 5000, 10000)
    assert data.train_x.shape[1:] == (3, 32, 32)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert torch.allclose(data.mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.005)


# --- prepared cache -------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_errors(tmp_path, digits):
    path = tmp_path / "prepared.pt"
    save_prepared(digits, path)
    back = load_prepared(path)
    for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "mean", "std"):
        assert torch.equal(getattr(back, k), getattr(digits, k))
    assert back.classes == digits.classes and back.meta == digits.meta
    with pytest.raises(DatasetError, match="nothere.pt: prepared dataset not found"):
        load_prepared(tmp_path / "nothere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="bad.pt: not a readable prepared dataset"):
        load_prepared(bad)
    obj = digits.to_dict()
    obj["train_y"] = obj["train_y"].clone()
    obj["train_y"][0] = (obj["train_y"][0] + 1) % 10
    torch.save(obj, tmp_path / "edited.pt")
    with pytest.raises(DatasetError, match="content hash mismatch"):
        load_prepared(tmp_path / "edited.pt")


def test_channel_stats_exact():
    x = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(mean.double(), ref.mean(1), atol=1e-6)
    assert torch.allclose(std.double(), ref.std(1, unbiased=False), atol=1e-6)


# --- loaders --------------------------------------------------------------------------------------------


def toy_split(n: int = 10, c: int = 3, h: int = 5, w: int = 6):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 4
    mean, std = torch.tensor([0.5, 0.4, 0.3][:c]), torch.tensor([0.2, 0.25, 0.3][:c])
    return x, y, mean, std


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_device_loader_plain_batches_are_normalised():
    x, y, mean, std = toy_split(10)
    loader = DeviceLoader(x, y, mean, std, batch_size=4)
    assert len(loader) == 3 and len(DeviceLoader(x, y, mean, std, batch_size=4, drop_last=True)) == 2
    batches = collect(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and xb.shape == (4, 3, 5, 6)
    ref = (x[:4].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(xb, ref, atol=1e-6) and torch.equal(yb, y[:4])
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    half = DeviceLoader(x, y, mean, std, batch_size=4, dtype=torch.bfloat16, channels_last=True)
    hb, _ = next(iter(half))
    assert hb.dtype == torch.bfloat16 and hb.is_contiguous(memory_format=torch.channels_last)


def naive_augment(img: torch.Tensor, flip: bool, r: int, c: int, pad: int) -> torch.Tensor:
    """Reference: flip, reflect-pad (numpy), crop; one image at a time."""
    a = img.numpy()
    if flip:
        a = a[:, :, ::-1]
    a = np.pad(a, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    return torch.from_numpy(np.ascontiguousarray(a[:, r : r + img.shape[1], c : c + img.shape[2]]))


def test_device_loader_augmentation_matches_naive_reference():
    from gkd_core.data import epoch_plan

    x, y, mean, std = toy_split(12)
    pad = 3
    loader = DeviceLoader(x, y, mean, std, 5, shuffle=True, augment=True, crop_padding=pad, hflip=True, seed=7)
    order, flips, offsets = epoch_plan(12, 7, 0, True, True, pad)
    assert flips.any() and not flips.all() and offsets.max() <= 2 * pad and (offsets != pad).any()
    got = torch.cat([b for b, _ in loader])
    labels = torch.cat([lab for _, lab in DeviceLoader(x, y, mean, std, 5, shuffle=True, seed=7)])
    assert torch.equal(labels, y[order])
    for j in range(12):
        ref = naive_augment(x[order[j]], bool(flips[j]), int(offsets[j, 0]), int(offsets[j, 1]), pad)
        ref = (ref.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
        assert torch.allclose(got[j], ref, atol=1e-6), j


@pytest.mark.parametrize("pad,flip_only", [(1, False), (4, False), (0, True)])
def test_batch_augment_equals_pad_then_crop(pad, flip_only):
    from gkd_core.data import batch_augment

    x, _, _, _ = toy_split(9, c=2, h=5, w=7)
    g = torch.Generator().manual_seed(pad)
    flips = torch.rand(9, generator=g) < 0.5
    offsets = None if flip_only else torch.randint(0, 2 * pad + 1, (9, 2), generator=g)
    got = batch_augment(x, flips, offsets, pad)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    for j in range(9):
        r, c = (pad, pad) if offsets is None else offsets[j].tolist()
        assert torch.equal(got[j], naive_augment(x[j], bool(flips[j]), r, c, pad)), j


def test_device_loader_determinism_epochs_and_resume():
    x, y, mean, std = toy_split(40, h=8, w=8)
    kw = dict(batch_size=8, shuffle=True, augment=True, crop_padding=2, hflip=True, seed=3)
    a, b = DeviceLoader(x, y, mean, std, **kw), DeviceLoader(x, y, mean, std, **kw)
    a0, b0 = collect(a), collect(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a0, b0))
    a1 = collect(a)
    assert not torch.equal(torch.cat([t[1] for t in a0]), torch.cat([t[1] for t in a1]))  # new order each epoch
    other = collect(DeviceLoader(x, y, mean, std, **{**kw, "seed": 4}))
    assert not torch.equal(torch.cat([t[0] for t in a0]), torch.cat([t[0] for t in other]))
    from_gen = collect(DeviceLoader(x, y, mean, std, **{**kw, "seed": torch.Generator().manual_seed(3)}))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a0, from_gen))  # a torch.Generator seeds it too
    state = a.state_dict()
    assert state["epoch"] == 2
    a2 = collect(a)
    resumed = DeviceLoader(x, y, mean, std, **kw)
    resumed.load_state_dict(state)
    r2 = collect(resumed)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a2, r2))
    resumed.set_epoch(1)
    assert torch.equal(torch.cat([t[0] for t in collect(resumed)]), torch.cat([t[0] for t in a1]))


def test_loader_rejects_padding_larger_than_image():
    x, y, mean, std = toy_split(4, h=4, w=4)
    with pytest.raises(ValueError, match="crop_padding = 4"):
        DeviceLoader(x, y, mean, std, 2, augment=True, crop_padding=4)
    DeviceLoader(x, y, mean, std, 2, augment=False, crop_padding=4)  # no augmentation: padding unused


def test_torch_loader_matches_device_loader():
    x, y, mean, std = toy_split(23, h=8, w=8)
    plain = dict(batch_size=5, shuffle=False)
    dev, tor = collect(DeviceLoader(x, y, mean, std, **plain)), collect(TorchLoader(x, y, mean, std, **plain))
    assert len(dev) == len(tor) == 5
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(dev, tor))
    aug = dict(batch_size=5, shuffle=True, augment=True, crop_padding=3, hflip=True, drop_last=True, seed=11)
    d, t = DeviceLoader(x, y, mean, std, **aug), TorchLoader(x, y, mean, std, **aug)
    assert len(d) == len(t) == 4
    for _ in range(2):  # same augmentation draws, two epochs
        dev, tor = collect(d), collect(t)
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(dev, tor))
    assert t.state_dict() == {"epoch": 2, "seed": 11}


def test_torch_loader_with_worker_process():
    x, y, mean, std = toy_split(16, h=8, w=8)
    aug = dict(batch_size=4, shuffle=True, augment=True, crop_padding=2, hflip=True, seed=1)
    dev = collect(DeviceLoader(x, y, mean, std, **aug))
    loader = TorchLoader(x, y, mean, std, num_workers=1, **aug)
    tor = collect(loader)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(dev, tor))
    workers = loader._loader._iterator._workers  # persistent between epochs
    assert all(w.is_alive() for w in workers)
    loader.close()
    assert [w.exitcode for w in workers] == [0]  # a clean shutdown, now rather than at garbage collection
    loader.set_epoch(0)  # closing releases the workers only: the next iter() starts new ones
    again = collect(loader)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(dev, again))
    loader.close()


def test_make_loaders(digits):
    tc = TrainConfig(batch_size=64, crop_padding=2)
    train, val, test = make_loaders(digits, tc, "auto", "cpu", seed=0, num_workers=0)
    assert all(isinstance(ld, DeviceLoader) for ld in (train, val, test))
    assert len(train) == len(digits.train_y) // 64  # drop_last on the training split
    assert len(val) == -(-len(digits.val_y) // 64) and len(test) == -(-len(digits.test_y) // 64)
    assert train.augment and train.hflip and train.crop_padding == 2 and not val.augment
    xb, yb = next(iter(test))
    assert xb.shape == (64, 1, 8, 8) and torch.equal(yb, digits.test_y[:64])
    t_train, _, t_test = make_loaders(digits, tc, "torch", "cpu", seed=0, num_workers=0)
    assert isinstance(t_train, TorchLoader) and len(t_train) == len(train)
    assert torch.equal(next(iter(t_test))[0], xb)
    assert torch.equal(torch.cat([b for b, _ in t_train]), torch.cat([b for b, _ in train]))
    flat = make_loaders(digits, TrainConfig(augment=False), "device", "cpu", seed=0)[0]
    assert not flat.augment and flat.crop_padding == 0 and not flat.hflip


def test_auto_loader_choice(monkeypatch, digits):
    from gkd_core.data import choose_loader

    assert choose_loader(digits, "auto", "cpu") == "device"
    assert choose_loader(digits, "torch", "cpu") == "torch"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * digits.nbytes + 4, 10**12))
    assert choose_loader(digits, "auto", "cuda") == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * digits.nbytes - 4, 10**12))
    assert choose_loader(digits, "auto", "cuda:0") == "torch"
    with pytest.raises(ValueError, match="runtime.loader"):
        choose_loader(digits, "gpu", "cpu")
