"""The one training loop, for teachers and students alike.

``fit(trainable, train_loader, val_loader, train_cfg, options)`` trains anything that keeps the
:class:`Trainable` contract: an ``nn.Module`` called as ``trainable(x, y, progress=p, step=s[, index=idx])``
that returns a dict of 0-dim tensors holding at least ``total`` (the loss to backward) and ``logits``, and
names the scalars it wants averaged per epoch (``metric_names``). A distillation method
(:class:`gkd_core.methods.Distiller`) keeps it; so does a teacher trained alone (method ``none``). The loop
never looks at which method it runs.

Per-step scalars are accumulated on the device and read once per epoch (plus a cheap finiteness flag every
``guard_every`` steps), so on a GPU the hot loop does not wait on the host. Checkpoints (:func:`save_checkpoint`,
:func:`load_checkpoint`, :func:`restore_checkpoint`) hold everything an exact resume needs: the trainable's
state (its schedule included), optimizer, LR scheduler, loader position, RNG and history.

The fast path on CUDA (see docs/performance.md): batches come from a ``DeviceLoader`` (whole split resident
as uint8, batched augmentation), the step runs under bf16 autocast, every 4-D weight is channels_last, the
optimizer is the fused kernel, ``compile=True`` asks the trainable to compile its networks, and the only host
reads are the per-epoch metric sums and the finiteness flag. A loader built ``with_index=True`` yields
``(x, y, idx)``; ``idx`` is passed on as ``trainable(..., index=idx)`` (a cached teacher reads it).

Several processes (an initialised process group, :mod:`gkd_core.distributed`; the loaders yield each rank's
share): the trainable's learnable parts train under ``DistributedDataParallel`` (``trainable.distribute``, or
DDP around the whole module for a trainable without it), epoch sums and counts and the validation counts are
all-reduced, the finiteness check stops every rank at the same step, rank 0 alone writes checkpoints and
calls the callbacks, and a checkpoint is read by rank 0 and broadcast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from gkd_core import distributed
from gkd_core.checkpoints import (Checkpointing, hold_after_checkpoint, load_checkpoint, restore_checkpoint,
                                  save_checkpoint)
from gkd_core.guard import NonFiniteGuard, NonFiniteLossError
from gkd_core.progress import TrainingProgress
from gkd_core.sections import TrainConfig

__all__ = [
    "Trainable", "FitOptions", "FitResult", "Checkpointing", "NonFiniteLossError", "Callback", "fit", "evaluate",
    "predict", "resolve_device", "seed_everything", "build_optimizer", "lr_factor", "progress_at",
    "config_fingerprint", "Plateau",
]

logger = logging.getLogger(__name__)

Callback = Callable[[str, float, int], None]
"""Receives every metric once per epoch: ``(name, value, step)`` with step = epoch number (1-based)."""

@runtime_checkable
class Trainable(Protocol):
    """What :func:`fit` trains (see the module docstring). Besides being an ``nn.Module``:

    - ``metric_names``: output key -> history column, for the scalars averaged per epoch; must include
      ``total`` (the loss to backward).
    - ``param_groups(base_lr)``: the optimizer's parameter groups.
    - ``student``: the network evaluated on the validation split.
    - ``compile_networks()``: ``torch.compile`` what is worth compiling (asked for with ``compile=True``).
    - ``training_state()`` / ``load_training_state(state)``: what a checkpoint holds of it (not frozen parts).
    - ``end_epoch(progress, row)``: told each finished epoch's row (validation included) at its progress, before
      the checkpoint is written (an adaptive schedule learns from it).
    - optional ``shown_metric_names``: the history columns the epoch log line shows (default: all).
    - optionally ``distribute(wrap)`` / ``undistribute()``: route its learnable parts through ``wrap(module)``
      (DistributedDataParallel) for a multi-process run, and back (see :class:`gkd_core.methods.Distiller`).
    """

    student: nn.Module

    @property
    def metric_names(self) -> Mapping[str, str]: ...

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]: ...

    def compile_networks(self) -> None: ...

    def training_state(self) -> dict[str, Any]: ...

    def load_training_state(self, state: Mapping[str, Any]) -> None: ...

    def end_epoch(self, progress: float, row: Mapping[str, float]) -> None: ...


@dataclass
class FitOptions:
    """How :func:`fit` runs (everything that is not the model, the data or the training recipe)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = False
    compile: bool = False
    progress: str = "step"  # granularity of the training progress p: step | epoch
    progress_bar: bool | str = "auto"  # rich bar (gkd_core.progress): True | False | "auto" (stderr is a terminal)
    desc: str = "train"
    callbacks: Sequence[Callback] = ()  # called on rank 0 only when several processes train
    checkpoint: Optional[Checkpointing] = None  # written by rank 0 only
    guard: str = "auto"  # finiteness guard: sync (host read per step) | device (fused skip) | auto (see gkd_core.guard)
    guard_every: int = 50  # device guard: steps between host reads of its flag
    stop_after_epochs: Optional[int] = None  # end early, as a crash would (resume tests, time-boxed runs)


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_val_accuracy: float
    final_val_accuracy: float
    epochs_run: int
    resumed_from_epoch: Optional[int]
    train_seconds: float
    images_per_second: float
    best_val_epoch: Optional[int] = None
    best_state: Optional[dict[str, torch.Tensor]] = None  # the student's weights at the best validation epoch
    stopped_at_epoch: Optional[int] = None  # lr_schedule plateau: the epoch whose plateau ended training
    extra: dict[str, Any] = field(default_factory=dict)


# --- setup helpers ----------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device = {name!r} but CUDA is not available on this machine; use auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool = True, device: torch.device | None = None) -> None:
    """One seed drives python, numpy and torch. Deterministic algorithms are enforced on CPU only."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_optimizer(param_groups: Iterable[Any], cfg: TrainConfig, device: torch.device,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; the fused kernels on a GPU (or when ``fused``)."""
    fused = {"fused": True} if (device.type == "cuda" if fused is None else fused) else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay, **fused,
        )
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int,
              plateau: Optional["Plateau"] = None) -> float:
    """LR multiplier at a global step: linear warm-up, then cosine / multistep / constant over the rest, or
    (``plateau``) the product of the cuts a :class:`Plateau` has made so far."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "plateau":
        return plateau.factor if plateau is not None else 1.0
    t = (step - warmup) / max(total_steps - warmup, 1)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.lr_schedule == "multistep":
        done = step / max(total_steps, 1)
        return cfg.gamma ** sum(done >= m for m in cfg.milestones)
    return 1.0


class Plateau:
    """``lr_schedule: plateau``: watches validation accuracy once per evaluation. After ``patience`` evaluations
    without a gain above ``min_delta`` over the best so far it cuts the learning rate (``factor *= gamma``) and
    starts counting again; the plateau after ``reductions`` cuts stops training. Evaluations inside the warm-up
    only set the best (the learning rate is still rising). Its state is plain numbers, saved in checkpoints."""

    def __init__(self, cfg: TrainConfig):
        self.patience, self.min_delta = cfg.plateau.patience, cfg.plateau.min_delta
        self.reductions, self.gamma, self.warmup_epochs = cfg.plateau.reductions, cfg.gamma, cfg.warmup_epochs
        self.best, self.bad, self.cuts, self.factor, self.stopped_at = -math.inf, 0, 0, 1.0, None

    def observe(self, epoch: int, val_accuracy: float) -> str:
        """Told the validation accuracy after ``epoch`` (1-based); returns "improved", "waiting", "cut" or "stop"."""
        if val_accuracy > self.best + self.min_delta or epoch <= self.warmup_epochs:
            self.best, self.bad = max(self.best, val_accuracy), 0
            return "improved"
        self.bad += 1  # as torch's ReduceLROnPlateau: a gain under min_delta neither counts nor moves the best
        if self.bad < self.patience:
            return "waiting"
        self.bad = 0
        if self.cuts < self.reductions:
            self.cuts += 1
            self.factor *= self.gamma
            return "cut"
        self.stopped_at = epoch
        return "stop"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "cuts": self.cuts, "factor": self.factor,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.bad, self.cuts = float(state["best"]), int(state["bad"]), int(state["cuts"])
        self.factor, self.stopped_at = float(state["factor"]), state.get("stopped_at")


def progress_at(step: int, epoch: int, total_steps: int, epochs: int, granularity: str) -> float:
    """Training progress p in [0, 1]: per optimizer step (smooth) or per epoch (piecewise constant)."""
    if granularity == "epoch":
        return epoch / max(epochs - 1, 1)
    return min(step / max(total_steps - 1, 1), 1.0)


def config_fingerprint(*parts: Any) -> str:
    """A short hash of whatever defines a run, so a checkpoint is only resumed into the same run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- evaluation --------------------------------------------------------------------------------------


@torch.inference_mode()
def predict(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    amp: bool = True, channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels (CPU) of a whole split, in loader order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    use_amp = amp and device.type == "cuda"
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x)
        logits.append(out.float())
        labels.append(y.to(device, non_blocking=True))
    model.train(was_training)
    if not logits:  # an evaluation share with no image (a rank of more processes than images)
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    amp: bool = True, channels_last: bool = False, reduce: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over a loader (one host sync at the end).

    ``reduce``: the loader is this rank's share of the split; counts and loss sums are all-reduced, so every
    rank gets the figures of the whole split."""
    logits, y = predict(model, loader, device, amp=amp, channels_last=channels_last)
    if reduce:
        sums = torch.zeros(3, dtype=torch.float64)
        if len(y):
            sums[0] = float((logits.argmax(1) == y).sum())
            sums[1] = nn.functional.cross_entropy(logits, y, reduction="sum").double()
            sums[2] = len(y)
        correct, loss, n = distributed.sum_over_ranks(sums.to(device)).tolist()
        return {"accuracy": correct / n if n else float("nan"), "loss": loss / n if n else float("nan")}
    return {
        "accuracy": (logits.argmax(1) == y).float().mean().item() if len(y) else float("nan"),
        "loss": nn.functional.cross_entropy(logits, y).item() if len(y) else float("nan"),
    }


# --- the loop ----------------------------------------------------------------------------------------


def fit(trainable: Trainable, train_loader: Any, val_loader: Any, cfg: TrainConfig,
        options: Optional[FitOptions] = None) -> FitResult:
    """Train ``trainable`` for ``cfg.epochs`` epochs (see the module docstring and :class:`FitOptions`).

    With ``options.checkpoint`` a full-state checkpoint is written atomically after every epoch, and a
    matching one (same fingerprint) is continued exactly.
    """
    opt = options or FitOptions()
    device = opt.device
    ddp = distributed.active()
    main = not ddp or distributed.is_main()  # rank 0 writes and reports
    trainable.to(device)
    if opt.channels_last:
        # every 4-D weight (student, teacher, helper networks): a conv whose weight and input formats differ
        # converts the weight on every call
        trainable.to(memory_format=torch.channels_last)
    guard_mode = ("device" if device.type == "cuda" else "sync") if opt.guard == "auto" else opt.guard
    optimizer = build_optimizer(trainable.param_groups(cfg.lr), cfg, device,
                                fused=True if guard_mode == "device" else None)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (batch_size larger than the training split?)")
    total_steps = cfg.epochs * steps_per_epoch
    plateau = Plateau(cfg) if cfg.lr_schedule == "plateau" else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch, plateau)
    )
    history: list[dict[str, float]] = []
    start_epoch, resumed_from = 0, None
    best: dict[str, Any] = {"epoch": None, "accuracy": -math.inf, "state": None}
    ckpt = opt.checkpoint
    if ckpt is not None and ckpt.resume:
        state = load_checkpoint(ckpt.path, ckpt.fingerprint) if main else None
        if ddp:  # rank 0's file (other nodes need not see it), on every rank
            state = distributed.broadcast_object(state)
        if state is not None:
            start_epoch, history = restore_checkpoint(state, trainable, optimizer, scheduler, train_loader)
            best = dict(state.get("best") or best)
            if plateau is not None and state.get("plateau"):
                plateau.load_state_dict(state["plateau"])
            resumed_from = start_epoch
            logger.info("resumed %s from %s at epoch %d/%d", opt.desc, ckpt.path, start_epoch, cfg.epochs)
            if int(state.get("world_size", 1)) != distributed.world_size():
                logger.info("the checkpoint was written by %s process(es), this run has %d: the same global batches "
                            "and steps, numerically equal up to round-off and per-process BatchNorm statistics",
                            state.get("world_size", 1), distributed.world_size())
    if opt.compile:
        trainable.compile_networks()
    step_module: Any = trainable  # what each step calls
    if ddp:
        wrap = lambda module: distributed.wrap(module, device)  # noqa: E731
        if hasattr(trainable, "distribute"):
            trainable.distribute(wrap)  # DDP around the learnable parts; the frozen teacher stays outside
        else:
            step_module = wrap(trainable)
        val_batches = torch.tensor([len(val_loader) if val_loader is not None else 0], device=device)
        has_val_split = int(distributed.sum_over_ranks(val_batches).item()) > 0
    else:
        has_val_split = val_loader is not None and len(val_loader) > 0
    if plateau is not None and not has_val_split:
        raise ValueError(f"{opt.desc}: lr_schedule 'plateau' watches validation accuracy, and this run has no "
                         "validation split (dataset.val_fraction > 0 gives one)")

    loss_column = dict(trainable.metric_names)["total"]
    bar = TrainingProgress(opt.desc, cfg.epochs, steps_per_epoch, start_epoch, opt.progress_bar if main else False)
    hidden = _hidden_columns(trainable)
    n_images, t_train = 0, 0.0
    last_epoch = cfg.epochs if opt.stop_after_epochs is None else min(cfg.epochs, start_epoch + opt.stop_after_epochs)
    if plateau is not None and plateau.stopped_at is not None:
        last_epoch = start_epoch  # resumed from the checkpoint of a run that had already stopped on its plateau
    try:
        for epoch in range(start_epoch, last_epoch):
            plateau_note = None
            row, seen, seconds = _run_epoch(trainable, step_module, train_loader, optimizer, scheduler, cfg, opt,
                                            epoch, total_steps, bar)
            if ddp:  # every rank holds rank 0's model (BatchNorm statistics included): the one evaluated and saved
                distributed.broadcast_buffers([trainable.student])
            if has_val_split and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                ev = evaluate(trainable.student, val_loader, device, amp=opt.amp, channels_last=opt.channels_last,
                              reduce=ddp)
                row["val_accuracy"], row["val_loss"] = ev["accuracy"], ev["loss"]
                if ev["accuracy"] > best["accuracy"]:
                    best = {"epoch": epoch + 1, "accuracy": ev["accuracy"], "state": _cpu_state(trainable.student)}
                if plateau is not None:
                    plateau_note = _plateau_step(plateau, epoch + 1, ev["accuracy"], cfg, opt.desc)
            trainable.end_epoch(progress_at((epoch + 1) * steps_per_epoch - 1, epoch, total_steps, cfg.epochs,
                                            opt.progress), row)
            row["seconds"] = seconds
            row["images_per_second"] = seen / seconds if seconds > 0 else float("nan")
            n_images += seen
            t_train += seconds
            history.append(row)
            if main:
                logger.info("%s epoch %d/%d %s", opt.desc, epoch + 1, cfg.epochs, _fmt(row, hidden))
                if plateau_note:
                    logger.info("%s", plateau_note)  # after the epoch's own line: the cut or stop it caused
            bar.end_epoch(epoch + 1, row[loss_column], row.get("val_accuracy"))
            for cb in opt.callbacks if main else ():
                for name, value in row.items():
                    if name != "epoch":
                        cb(name, float(value), epoch + 1)
            if ckpt is not None and main:
                save_checkpoint(ckpt.path, fingerprint=ckpt.fingerprint, epoch=epoch + 1, trainable=trainable,
                                optimizer=optimizer, scheduler=scheduler, loader=train_loader, history=history,
                                best=best, world_size=distributed.world_size(),
                                plateau=plateau.state_dict() if plateau is not None else None)
                if ckpt.on_save is not None:
                    ckpt.on_save(ckpt.path)
                hold_after_checkpoint(epoch + 1)
            if plateau is not None and plateau.stopped_at is not None:
                break  # every rank: the decision is taken on the all-reduced validation accuracy
    finally:
        bar.close()
        if ddp and hasattr(trainable, "undistribute"):
            trainable.undistribute()

    vals = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    return FitResult(
        history=history,
        best_val_accuracy=max(vals) if vals else float("nan"),
        final_val_accuracy=vals[-1] if vals else float("nan"),
        epochs_run=len(history) - (resumed_from or 0),
        best_val_epoch=best["epoch"],
        best_state=best["state"],
        resumed_from_epoch=resumed_from,
        stopped_at_epoch=plateau.stopped_at if plateau is not None else None,
        train_seconds=t_train,
        images_per_second=n_images / t_train if t_train > 0 else float("nan"),
    )


def _plateau_step(plateau: Plateau, epoch: int, val_accuracy: float, cfg: TrainConfig, desc: str) -> Optional[str]:
    """Feed one evaluation to the plateau watcher; returns the line that reports a cut or the stop (else None)."""
    action = plateau.observe(epoch, val_accuracy)
    p = cfg.plateau
    if action == "cut":
        return (f"{desc}: validation accuracy has not gained {p.min_delta:.4f} over {plateau.best:.4f} in "
                f"{p.patience} evaluation(s): lr x {cfg.gamma:g} (cut {plateau.cuts} of {p.reductions})")
    if action == "stop":
        return (f"{desc}: validation accuracy plateaued at {plateau.best:.4f} after {plateau.cuts} lr cut(s): "
                f"stopped after epoch {epoch} of at most {cfg.epochs}")
    return None


def _run_epoch(trainable: Trainable, step_module: Any, loader: Any, optimizer: torch.optim.Optimizer,
               scheduler: Any, cfg: TrainConfig, opt: FitOptions, epoch: int, total_steps: int,
               bar: Any) -> tuple[dict[str, float], int, float]:
    """One epoch of steps (each calls ``step_module``: the trainable, or DDP around it); returns the epoch's row
    (lr, means of ``trainable.metric_names``, accuracy over every rank), the number of images seen (by every
    rank) and the seconds it took."""
    device = opt.device
    names = dict(trainable.metric_names)
    keys = list(names)
    use_amp = opt.amp and device.type == "cuda"
    steps_per_epoch = len(loader)
    trainable.train()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    sums = torch.zeros(len(keys) + 1, device=device)  # metrics * batch size, correct
    seen = 0  # host-side: batch sizes are shape metadata, reading them costs no sync
    guard = NonFiniteGuard(opt.guard, device, keys, trainable.parameters(), optimizer,
                           any_rank=distributed.any_rank if distributed.active() else None)
    out: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        step = epoch * steps_per_epoch + i
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        # a loader built with_index=True adds the batch's row numbers (for a cached teacher)
        extra = {"index": batch[2].to(device, non_blocking=True)} if len(batch) > 2 else {}
        if opt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        p = progress_at(step, epoch, total_steps, cfg.epochs, opt.progress)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = step_module(x, y, progress=p, step=step, **extra)
        optimizer.zero_grad(set_to_none=True)
        out["total"].backward()
        with torch.no_grad():
            guard.before_step(step, out)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            values = torch.stack([out[k].detach().float() for k in keys])
            correct = (out["logits"].detach().argmax(1) == y).sum()
            sums += torch.cat([values * len(y), correct.view(1).float()])
        seen += len(y)
        if (i + 1) % opt.guard_every == 0:
            guard.check()
        bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    guard.check()
    if distributed.active():  # the epoch's sums and counts over every rank
        reduced = distributed.sum_over_ranks(torch.cat([sums.double(), torch.tensor([seen], dtype=torch.float64, device=device)]))
        *totals, seen_all = reduced.tolist()
        seen = int(seen_all)
    else:
        totals = sums.tolist()  # the one host read of the epoch
    row: dict[str, float] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
    row.update({names[k]: v / seen for k, v in zip(keys, totals)})
    row["train_accuracy"] = totals[len(keys)] / seen
    return row, seen, seconds


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a (possibly compiled) model's weights."""
    plain = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}


_NOT_LOGGED = ("epoch", "seconds", "images_per_second")


def _hidden_columns(trainable: Any) -> frozenset[str]:
    """History columns left out of the epoch log line: those of ``metric_names`` that the trainable's
    ``shown_metric_names`` (optional) does not list, e.g. a teacher's always-zero KD/W/GM terms and weight.
    They stay in the history (the CSVs and plots read them)."""
    shown = getattr(trainable, "shown_metric_names", None)
    return frozenset() if shown is None else frozenset(dict(trainable.metric_names).values()) - set(shown)


def _fmt(row: Mapping[str, float], hidden: frozenset[str] = frozenset()) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in _NOT_LOGGED and k not in hidden)
