"""The two batch loaders over a prepared split, and the choice between them.

Loaders yield ``(x, y)``: ``x`` float, normalised ``(x / 255 - mean) / std``, on the target device; ``y``
int64. Both follow :func:`gkd_core.data.augment.epoch_plan` ``(seed, epoch)``, so the epoch-k batches are
identical for :class:`DeviceLoader` (the whole split on the device, one gather per batch) and
:class:`TorchLoader` (a ``torch.utils.data.DataLoader`` with optional worker processes), on CPU and on CUDA.
With ``with_index=True`` a training loader yields ``(x, y, idx)``: ``idx`` (int64, on the target device) are
the batch's row numbers in the split, which a cached teacher (:class:`gkd_core.methods.TeacherCache`) looks up.
With a :class:`~gkd_core.distributed.Shard` (several processes) a loader yields this rank's share of the same
plan: the strided share of every global batch (training) or of the split (evaluation).
``make_loaders(data, train_cfg, ...)`` builds the train/val/test loaders of a :class:`PreparedData`.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from gkd_core.distributed import Shard
from gkd_core.sections import TrainConfig
from gkd_core.data.augment import Normalizer, batch_augment, epoch_plan
from gkd_core.data.prepared import PreparedData, _describe

log = logging.getLogger(__name__)


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


class _LoaderBase:
    """What both loaders share: the checked split's target ``device``, ``batch_size``, ``seed``, the epoch
    counter (``epoch`` is the epoch the next ``iter()`` will use), ``with_index``, and :meth:`_output`, which
    turns a uint8 batch on the device into what iteration yields (normalised, ``dtype``, ``channels_last``)."""

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        mean: Union[Sequence[float], torch.Tensor],
        std: Union[Sequence[float], torch.Tensor],
        batch_size: int,
        augment: bool,
        crop_padding: int,
        device: Union[str, torch.device],
        seed: Union[int, torch.Generator],
        dtype: torch.dtype,
        channels_last: bool,
        with_index: bool,
        shard: Optional[Shard] = None,
    ):
        _check_split(x_uint8, y, batch_size, augment, crop_padding)
        if shard is not None:
            shard.batch(int(batch_size))  # refuses a training batch the processes cannot share equally
        self.shard = shard
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.seed = _seed_of(seed)
        self.epoch = 0
        self.with_index = bool(with_index)
        self.normalizer = Normalizer(mean, std, x_uint8.shape[1], self.device)
        self.dtype = dtype
        self.channels_last = bool(channels_last)

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

    def _output(self, xb: torch.Tensor, yb: torch.Tensor, idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``(x, y)``, or ``(x, y, idx)`` with ``with_index``, from a uint8 NCHW batch ``xb`` on the device:
        ``x`` is ``xb`` normalised (float32), cast to ``dtype``, in channels_last memory format if asked."""
        x = self.normalizer(xb)
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, yb, idx) if self.with_index else (x, yb)


class DeviceLoader(_LoaderBase):
    """The whole split on ``device`` as uint8; per batch: select rows, flip + crop (:func:`batch_augment`, one
    gather on the uint8 batch, which equals doing it after normalising: it only moves values), normalise.

    Epoch k (the counter advances when iteration starts; see :meth:`set_epoch`, :meth:`state_dict`) uses
    :func:`epoch_plan` ``(seed, k)``. ``len()`` is the number of batches. ``with_index`` adds the batch's row
    numbers as a third element; ``shard`` makes it yield this rank's share (:class:`Shard`).
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
        shard: Optional[Shard] = None,
    ):
        super().__init__(
            x_uint8, y, mean, std, batch_size, augment, crop_padding, device, seed, dtype, channels_last, with_index,
            shard,
        )
        self.x = x_uint8.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.crop_padding = int(crop_padding) if augment else 0
        self.hflip = bool(hflip) and bool(augment)
        self.drop_last = bool(drop_last)

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        if self.shard is not None:
            return self.shard.num_batches(n, b, self.drop_last)
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        self.epoch += 1
        n = self.num_samples
        order, flips, offsets = epoch_plan(n, self.seed, epoch, self.shuffle, self.hflip, self.crop_padding)
        batch = self.batch_size
        if self.shard is not None:  # this rank's positions of the plan every rank draws
            pos = self.shard.positions(n, batch, self.drop_last)
            order, flips, offsets = (t[pos] if t is not None else None for t in (order, flips, offsets))
            batch = self.shard.batch(batch)
        order = order.to(self.device)
        flips = flips.to(self.device) if flips is not None else None
        offsets = offsets.to(self.device) if offsets is not None else None
        return self._batches(order, flips, offsets, batch)

    def _batches(
        self, order: torch.Tensor, flips: Optional[torch.Tensor], offsets: Optional[torch.Tensor], batch: int
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(len(self)):
            sl = slice(i * batch, (i + 1) * batch)
            idx = order[sl]
            xb = self.x.index_select(0, idx)
            if flips is not None or offsets is not None:
                xb = batch_augment(
                    xb,
                    flips[sl] if flips is not None else None,
                    offsets[sl] if offsets is not None else None,
                    self.crop_padding,
                )
            yield self._output(xb, self.y.index_select(0, idx), idx)


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

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, shuffle: bool, hflip: bool, pad: int,
                 shard: Optional[Shard] = None):
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.seed, self.shuffle, self.hflip, self.pad = seed, shuffle, hflip, pad
        self.shard = shard
        self.epoch = 0

    def __len__(self) -> int:
        if self.shard is not None:
            return self.shard.num_batches(self.n, self.batch_size, self.drop_last)
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool, int, int]]]:
        order, flips, offsets = epoch_plan(self.n, self.seed, self.epoch, self.shuffle, self.hflip, self.pad)
        m, batch = self.n, self.batch_size
        if self.shard is not None:  # this rank's positions of the plan every rank draws
            pos = self.shard.positions(self.n, batch, self.drop_last)
            order, flips, offsets = (t[pos] if t is not None else None for t in (order, flips, offsets))
            m, batch = len(pos), self.shard.batch(batch)
        o = order.tolist()
        f = flips.tolist() if flips is not None else [False] * m
        rc = offsets.tolist() if offsets is not None else [(0, 0)] * m
        for i in range(len(self)):
            lo, hi = i * batch, min((i + 1) * batch, m)
            yield [(o[j], f[j], rc[j][0], rc[j][1]) for j in range(lo, hi)]


def _worker_context(num_workers: int) -> Optional[str]:
    """Start DataLoader workers from a clean forkserver, not by forking the caller.

    A forked worker inherits the parent's threads and fork handlers: in a process that has run a Prefect flow
    such workers die with exit code 1 when they are shut down, and the DataLoader then raises. The
    forkserver starts from a fresh interpreter and preloads this module, which defines the dataset class the
    workers unpickle (so torch: ~1.7 s once per process); each worker still imports the caller's main module
    once, as with ``spawn``. The uint8 tensors reach the workers through shared memory, once, since the workers
    are persistent.
    """
    if num_workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    multiprocessing.set_forkserver_preload(["__main__", __name__])  # takes effect when the forkserver first starts
    return "forkserver"


class TorchLoader(_LoaderBase):
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
        shard: Optional[Shard] = None,
    ):
        super().__init__(
            x_uint8, y, mean, std, batch_size, augment, crop_padding, device, seed, dtype, channels_last, with_index,
            shard,
        )
        pad = int(crop_padding) if augment else 0
        self._n = int(x_uint8.shape[0])
        self._sampler = _PlannedBatchSampler(
            self._n, self.batch_size, bool(drop_last), self.seed, bool(shuffle), bool(hflip) and bool(augment), pad,
            shard,
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
        for batch in batches:  # (x, y) or, with_index, (x, y, idx): uint8/int64 on the host
            xb, yb, *idx = (t.to(self.device, non_blocking=non_blocking) for t in batch)
            yield self._output(xb, yb, idx[0] if idx else None)


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
    rank: int = 0,
    world_size: int = 1,
    with_test: bool = True,
) -> tuple[Loader, Loader, Optional[Loader]]:
    """``(train, val, test)`` loaders (test None with ``with_test=False``: training never needs it). Train: shuffled, augmented per ``train_cfg`` (augment, crop_padding,
    hflip), ``drop_last`` when it holds at least one full batch, yielding ``(x, y, idx)`` with ``with_index``.
    Val/test: in order, not augmented, ``(x, y)``. With ``world_size > 1`` each yields ``rank``'s share
    (:class:`~gkd_core.distributed.Shard`: equal training batches of ``batch_size / world_size``, disjoint
    evaluation shares)."""
    kind = choose_loader(data, runtime_loader, device)
    shards: tuple[Optional[Shard], Optional[Shard]] = (None, None)
    if world_size > 1:
        shards = (Shard(rank, world_size, pad=True), Shard(rank, world_size, pad=False))
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
        shard=shards[0], **common,
    )
    val = cls(data.val_x, data.val_y, shuffle=False, augment=False, drop_last=False, shard=shards[1], **common)
    if not with_test:  # training: the test split stays untouched (not even moved to the device)
        log.info("loaders: %s on %s, %d/%d batches (train/val)", kind, device, len(train), len(val))
        return train, val, None
    test = cls(data.test_x, data.test_y, shuffle=False, augment=False, drop_last=False, shard=shards[1], **common)
    log.info("loaders: %s on %s, %d/%d/%d batches (train/val/test)", kind, device, len(train), len(val), len(test))
    return train, val, test
