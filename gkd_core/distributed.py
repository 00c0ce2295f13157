"""Several processes, one run: torch.distributed under torchrun, DistributedDataParallel, sharded epoch plans.

Nothing here is home-made distributed machinery. The process group is PyTorch's, joined from the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; gloo on CPU, nccl on
CUDA, with a bounded timeout); gradients are averaged by ``torch.nn.parallel.DistributedDataParallel``;
feature batches are gathered with ``torch.distributed.nn.functional.all_gather``, which keeps gradients.
This module holds the rules (docs/performance.md, "Multi-process (DDP)"):

* **Global batch.** ``train.batch_size`` is the batch of one optimizer step over all processes: each of the
  W processes takes ``batch_size / W`` images per step (it must divide). Steps per epoch, the LR schedule and
  the distillation progress p (global optimizer steps, the same on every rank) are those of one process.
* **Sharding** (:class:`Shard`). Every rank draws the same ``epoch_plan(n, seed, epoch)``. Training: global
  batch i is plan positions ``[i*B, (i+1)*B)``, as in one process; rank r takes every W-th of them from r on
  (DistributedSampler's strided rule). With ``drop_last`` (every training split of at least one batch) the
  last ``n mod B`` positions of the permuted plan are left out of that epoch, exactly as in one process; a
  last partial batch (``drop_last`` off) is padded to a multiple of W with the epoch's first positions.
  Evaluation: rank r takes positions r, r+W, ... (no padding, no image twice); counts are all-reduced.
* **DDP wraps the trainable parts only**: the student together with the method's learnable parameters (the
  feature projector, AKD's CAM, DynamicKD's controller) in one module (:class:`TrainableParts`); the frozen
  teacher is never wrapped and never receives gradients.
* **Batch-level terms see the global batch**: the Wasserstein term is computed on the features of all ranks
  (:func:`gather_rows`), AKD's gap and CES-KD's difficulty ranks likewise; per-sample terms (CE, KD, gradient
  matching) are local and DDP's gradient average makes them global.
* **Rank 0 writes** (checkpoints, reports, MLflow); a checkpoint is read by rank 0 and broadcast.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "Shard", "TrainableParts", "rank", "local_rank", "world_size", "is_main",
    "active", "init_from_env", "shutdown", "loss_group", "gather_rows", "mean_over_ranks", "sum_over_ranks",
    "any_rank", "broadcast_object", "broadcast_buffers", "wrap",
]

TIMEOUT_ENV = "GKD_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks before the run fails
DEFAULT_TIMEOUT_S = 600.0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes: the process group's, else torchrun's ``WORLD_SIZE`` (before the group is
    joined), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` when ``WORLD_SIZE`` > 1, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs metrics."""
    return rank() == 0


def init_from_env(device: torch.device, timeout_s: Optional[float] = None) -> torch.device:
    """Join the process group torchrun describes (once per process) and return this rank's device.

    Without torchrun (``WORLD_SIZE`` unset or 1) nothing happens and ``device`` is returned as is. On CUDA
    rank r of a node uses ``cuda:LOCAL_RANK`` (set as the current device) and the nccl backend; on CPU, gloo.
    Collectives wait at most ``timeout_s`` (default ``$GKD_DIST_TIMEOUT`` or 600 s) for the other ranks.
    """
    if world_size() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return device
    if device.type == "cuda":
        local = local_rank()
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()} "
                               "(runtime.nproc or torchrun --nproc-per-node must not exceed the GPUs per node)")
        if device.index is not None and device.index != local:
            logger.warning("runtime.device = %s: with several processes rank %d uses cuda:%d", device, rank(), local)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        seconds = float(timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=seconds))
        logger.info("process group: rank %d of %d (%s, %s, timeout %.0f s)", dist.get_rank(), dist.get_world_size(),
                    backend, device, seconds)
    return device


def shutdown() -> None:
    """Leave the process group (after a run that finished on every rank)."""
    global _LOSS_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _LOSS_GROUP = None


_LOSS_GROUP: Any = None


def loss_group() -> Any:
    """The process group of the losses' collectives (feature gathers in forward and backward, batch
    statistics). Apart from DDP's own group, so its gradient all-reduces and the gathers' backward never
    interleave on one communicator. Created on first use, which every rank reaches at the same point."""
    global _LOSS_GROUP
    if _LOSS_GROUP is None:
        _LOSS_GROUP = dist.new_group()
    return _LOSS_GROUP


# --- sharding -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """This rank's share of every epoch plan (see the module docstring).

    ``pad=True`` (training): every rank gets the same number of equal batches of ``batch_size / world_size``
    images, the strided share of each global batch. ``pad=False`` (evaluation): positions ``rank::world_size``
    in batches of ``batch_size``, each image on exactly one rank.
    """

    rank: int
    world_size: int
    pad: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    def batch(self, batch_size: int) -> int:
        """Images per batch on this rank."""
        if not self.pad:
            return batch_size
        if batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size = {batch_size} is not a multiple of the {self.world_size} processes: the batch "
                "size is the global batch of one optimizer step, each process takes batch_size / processes images"
            )
        return batch_size // self.world_size

    def positions(self, n: int, batch_size: int, drop_last: bool) -> Tensor:
        """The plan positions this rank visits, in order (int64); batch i is ``[i*b, (i+1)*b)`` of them with
        ``b = self.batch(batch_size)``."""
        w, r = self.world_size, self.rank
        if not self.pad:
            return torch.arange(n)[r::w]
        self.batch(batch_size)
        full = (n // batch_size) * batch_size
        pos = torch.arange(full)[r::w]  # the strided share of every full global batch
        if not drop_last and full < n:
            tail = torch.arange(full, n)
            short = -len(tail) % w
            if short:  # pad the last global batch with the epoch's first positions (DistributedSampler's rule)
                tail = torch.cat([tail, torch.arange(short) % n])
            pos = torch.cat([pos, tail[r::w]])
        return pos

    def num_batches(self, n: int, batch_size: int, drop_last: bool) -> int:
        """Batches per epoch on this rank (training: the global steps, the same on every rank)."""
        if self.pad:
            return n // batch_size if drop_last else -(-n // batch_size)
        return -(-len(range(self.rank, n, self.world_size)) // batch_size)


# --- DDP ----------------------------------------------------------------------------------------------


class TrainableParts(nn.Module):
    """What DDP wraps for a distiller: the student (its forward is this module's) with the method's learnable
    parameters registered alongside, so that DDP averages their gradients too. The teacher is not in it."""

    def __init__(self, student: nn.Module, extra: Iterable[nn.Parameter] = ()) -> None:
        super().__init__()
        self.student = student
        self.extra = nn.ParameterList(list(extra))

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` for this rank's device (rank 0's weights and buffers are broadcast
    now; BatchNorm buffers again before every forward)."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


# --- collectives ------------------------------------------------------------------------------------------


def gather_rows(x: Tensor, grad: bool = False) -> Tensor:
    """Every rank's rows of ``x`` (equal shapes), concatenated in rank order.

    ``grad=True`` keeps the graph (``torch.distributed.nn.functional.all_gather``): its backward sums the
    gradients that every rank's loss sends to this rank's rows. A loss computed identically on every rank
    from the gathered rows therefore gives each rank W times its share, and DDP's average over W ranks
    makes the parameter gradient that of one process computing the loss on the whole global batch.
    """
    group = loss_group()
    if grad:
        with warnings.catch_warnings():  # deprecated in favour of a private API (_functional_collectives)
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_gather

            return torch.cat(all_gather(x.contiguous(), group=group))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts)


def mean_over_ranks(x: Tensor) -> Tensor:
    """The mean over ranks of a detached statistic (a batch mean over equal local batches: the global one)."""
    y = x.detach().clone()
    dist.all_reduce(y, group=loss_group())
    return y / dist.get_world_size()


def sum_over_ranks(x: Tensor) -> Tensor:
    """``x`` summed over ranks, in place (metric sums and counts)."""
    dist.all_reduce(x)
    return x


def any_rank(flag: Tensor) -> Tensor:
    """True on every rank if ``flag`` (a 0-dim bool) is True on any (no host read)."""
    f = flag.to(torch.uint8)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return f.bool()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (a resume checkpoint read by rank 0)."""
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(modules: Sequence[nn.Module]) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so every rank holds the model rank 0
    evaluates and saves."""
    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)
