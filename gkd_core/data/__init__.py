"""Datasets: a registry of raw readers, the prepared uint8 cache, and the two batch loaders.

Flow: ``check_dataset_source(cfg)`` (cheap path/format checks, before any heavy work) ->
``prepare_dataset(cfg, seed)`` (read the raw set, hold out a stratified validation split, apply ``limit``,
compute per-channel statistics) -> ``save_prepared`` / ``load_prepared`` (one ``torch.save`` file of a plain
dict) -> ``make_loaders(...)``.

Modules:
- :mod:`~gkd_core.data.raw`: :class:`DatasetError`, :class:`RawDataset` and the seeded stratified splits
  (which split depends on ``params.seed`` and which never does).
- :mod:`~gkd_core.data.sources`: the :data:`DATASETS` registry (digits, Fashion-MNIST, CIFAR-10/100) and
  :func:`check_dataset_source`; :mod:`~gkd_core.data.image_folder`: image folders and tar archives.
- :mod:`~gkd_core.data.prepared`: :class:`PreparedData`, :func:`prepare_dataset`, the cache file.
- :mod:`~gkd_core.data.augment`: per-epoch plans, batched flip/crop, normalisation (:class:`Normalizer`).
- :mod:`~gkd_core.data.loaders`: :class:`DeviceLoader`, :class:`TorchLoader`, :func:`make_loaders`.

Every public name is importable from ``gkd_core.data`` itself.
"""

from gkd_core.data.augment import Normalizer, batch_augment, epoch_plan, normalise
from gkd_core.data.image_folder import (
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
    Refused,
    check_image_folder_source,
    is_archive,
    iter_images,
    load_image_folder_raw,
    open_image,
    read_image_file,
)
from gkd_core.data.loaders import DeviceLoader, Loader, TorchLoader, choose_loader, make_loaders
from gkd_core.data.prepared import (
    PREPARED_FORMAT,
    PreparedData,
    channel_stats,
    load_prepared,
    prepare_dataset,
    save_prepared,
)
from gkd_core.data.raw import TEST_FRACTION, TEST_SPLIT_SEED, DatasetError, RawDataset, stratified_split
from gkd_core.data.sources import (
    DATASETS,
    FASHION_CLASSES,
    FASHION_FILES,
    IDX_MAGIC_IMAGES,
    IDX_MAGIC_LABELS,
    check_dataset_source,
    load_cifar10_raw,
    load_cifar100_raw,
    load_digits_raw,
    load_fashion_mnist_raw,
    read_idx,
)

__all__ = [
    # raw: errors, raw arrays, splits
    "DatasetError",
    "RawDataset",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "stratified_split",
    # sources
    "DATASETS",
    "FASHION_CLASSES",
    "FASHION_FILES",
    "IDX_MAGIC_IMAGES",
    "IDX_MAGIC_LABELS",
    "check_dataset_source",
    "load_cifar10_raw",
    "load_cifar100_raw",
    "load_digits_raw",
    "load_fashion_mnist_raw",
    "read_idx",
    # image folders
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "check_image_folder_source",
    "is_archive",
    "iter_images",
    "Refused",
    "open_image",
    "read_image_file",
    "load_image_folder_raw",
    # prepared data
    "PREPARED_FORMAT",
    "PreparedData",
    "channel_stats",
    "load_prepared",
    "prepare_dataset",
    "save_prepared",
    # augmentation and normalisation
    "Normalizer",
    "batch_augment",
    "epoch_plan",
    "normalise",
    # loaders
    "DeviceLoader",
    "Loader",
    "TorchLoader",
    "choose_loader",
    "make_loaders",
]
