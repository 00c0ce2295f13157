"""The one training loop, for teachers and students alike.

Read it top to bottom: ``fit`` builds the optimizer and LR schedule, optionally resumes from a full-state
checkpoint, then runs epochs of ``distiller(x, y, progress) -> dict`` / backward / step. Per-step loss
terms are accumulated on the device and read once per epoch (plus a cheap finiteness flag every
``guard_every`` steps), so on a GPU the hot loop does not wait on the host.

A teacher is trained with a Distiller whose teacher is None (method ``none``): one loop for both.

The fast path on CUDA (see docs/performance.md): batches come from a ``DeviceLoader`` (whole split resident
as uint8, batched augmentation), the step runs under bf16 autocast, student and teacher are channels_last,
the optimizer is the fused kernel, ``compile=True`` compiles the student and the (frozen) teacher, and the
only host reads are the per-epoch metric sums and the finiteness flag. A loader built ``with_index=True``
yields ``(x, y, idx)``; ``idx`` is passed on as ``distiller(..., index=idx)`` for a cached teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from gkd_core.config import TrainConfig
from gkd_core.io import torch_save

logger = logging.getLogger(__name__)

Callback = Callable[[str, float, int], None]
"""Receives every metric once per epoch: ``(name, value, step)`` with step = epoch number (1-based)."""

# Loss terms accumulated per step (their sum is read once per epoch).
TERMS = ("total", "ce", "kd", "wasserstein", "grad_match", "weight")
CHECKPOINT_FORMAT = "gkd-checkpoint/1"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the epoch, step range and terms."""


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_val_accuracy: float
    final_val_accuracy: float
    epochs_run: int
    resumed_from_epoch: Optional[int]
    train_seconds: float
    images_per_second: float
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


def build_optimizer(param_groups: Iterable[Any], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW; the fused CUDA kernels when on a GPU."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay, **fused,
        )
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """LR multiplier at a global step: linear warm-up, then cosine / multistep / constant over the rest."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total_steps - warmup, 1)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.lr_schedule == "multistep":
        done = step / max(total_steps, 1)
        return cfg.gamma ** sum(done >= m for m in cfg.milestones)
    return 1.0


def progress_at(step: int, epoch: int, total_steps: int, epochs: int, granularity: str) -> float:
    """Training progress p in [0, 1]: per optimizer step (smooth) or per epoch (piecewise constant)."""
    if granularity == "epoch":
        return epoch / max(epochs - 1, 1)
    return min(step / max(total_steps - 1, 1), 1.0)


def config_fingerprint(*parts: Any) -> str:
    """A short hash of whatever defines a run, so a checkpoint is only resumed into the same run."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(distiller: nn.Module) -> dict[str, torch.Tensor]:
    """The distiller's state without the frozen teacher (it is a dependency, not part of the run)."""
    return {k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")}


def _param_groups(distiller: nn.Module, cfg: TrainConfig) -> Iterable[Any]:
    groups = getattr(distiller, "param_groups", None)
    if callable(groups):
        return groups(cfg.lr)
    return [p for p in distiller.trainable_parameters()]


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
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def evaluate(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
    amp: bool = True, channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` over a loader (one host sync at the end)."""
    logits, y = predict(model, loader, device, amp=amp, channels_last=channels_last)
    return {
        "accuracy": (logits.argmax(1) == y).float().mean().item() if len(y) else float("nan"),
        "loss": nn.functional.cross_entropy(logits, y).item() if len(y) else float("nan"),
    }


# --- the loop ----------------------------------------------------------------------------------------


def fit(
    distiller: nn.Module,
    train_loader: Any,
    val_loader: Any,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress_granularity: str = "step",
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = True,
    fingerprint: str = "",
    callbacks: Sequence[Callback] = (),
    amp: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    progress_bar: bool = True,
    guard_every: int = 50,
    stop_after_epochs: Optional[int] = None,
    desc: str = "train",
) -> FitResult:
    """Train ``distiller.student`` (and the distiller's own learnable parts) for ``cfg.epochs`` epochs.

    A full-state checkpoint (trainable weights, optimizer, LR scheduler, distillation schedule, RNG, data
    order, history) is written atomically after every epoch when ``checkpoint_path`` is given; with
    ``resume`` a matching checkpoint (same ``fingerprint``) is continued exactly. ``stop_after_epochs``
    ends the call early (as a crash would) and exists for resume tests and time-boxed runs.
    """
    from tqdm.auto import tqdm

    distiller.to(device)
    student = distiller.student
    teacher = getattr(distiller, "teacher", None)
    if channels_last:
        # every 4-D weight (student, teacher, CES-KD assistants): a conv whose weight and input formats differ
        # converts the weight on every call
        distiller.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(_param_groups(distiller, cfg), cfg, device)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (batch_size larger than the training split?)")
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg, steps_per_epoch)
    )
    history: list[dict[str, float]] = []
    start_epoch, resumed_from = 0, None
    ckpt = Path(checkpoint_path) if checkpoint_path else None

    if ckpt is not None and resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
            logger.warning("checkpoint %s belongs to another run configuration; starting fresh", ckpt)
        else:
            missing, unexpected = distiller.load_state_dict(state["distiller"], strict=False)
            bad = [k for k in missing if not k.startswith("teacher.")] + list(unexpected)
            if bad:
                raise RuntimeError(f"checkpoint {ckpt} does not match the model: {bad[:5]}")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            distiller.schedule.load_state_dict(state["schedule"])
            if hasattr(train_loader, "load_state_dict"):
                train_loader.load_state_dict(state["loader"])
            _set_rng_state(state["rng"])
            history = state["history"]
            start_epoch = resumed_from = state["epoch"]
            logger.info("resumed %s from %s at epoch %d/%d", desc, ckpt, start_epoch, cfg.epochs)

    if compile:
        student.compile()
        # the teacher's forward is most of a KD step's launches; compile it unless a cache replaces it
        cached = getattr(distiller, "teacher_cache", None) is not None
        if teacher is not None and getattr(distiller, "distill", True) and not cached:
            teacher.compile()

    use_amp = amp and device.type == "cuda"
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc=desc, disable=not progress_bar,
               unit="step", leave=False, dynamic_ncols=True)
    n_images, t_train = 0, 0.0
    last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start_epoch + stop_after_epochs)
    try:
        for epoch in range(start_epoch, last_epoch):
            distiller.train()
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            sums = torch.zeros(len(TERMS) + 1, device=device)  # terms * batch size, correct
            seen = 0  # host-side: batch sizes are shape metadata, reading them costs no sync
            bad = torch.zeros((), dtype=torch.bool, device=device)
            t0 = time.perf_counter()
            for i, batch in enumerate(train_loader):
                step = epoch * steps_per_epoch + i
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                # a loader built with_index=True adds the batch's row numbers (for a cached teacher)
                extra = {"index": batch[2].to(device, non_blocking=True)} if len(batch) > 2 else {}
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                p = progress_at(step, epoch, total_steps, cfg.epochs, progress_granularity)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    out = distiller(x, y, progress=p, step=step, **extra)
                optimizer.zero_grad(set_to_none=True)
                out["total"].backward()
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    terms = torch.stack([out[k].detach().float() for k in TERMS])
                    bad |= ~torch.isfinite(terms[0])
                    correct = (out["logits"].detach().argmax(1) == y).sum()
                    sums += torch.cat([terms * len(y), correct.view(1).float()])
                seen += len(y)
                if (i + 1) % guard_every == 0 and bool(bad):
                    _raise_non_finite(epoch, i, out)
                bar.update(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - t0
            totals = sums.tolist()  # the one host read of the epoch
            if bool(bad) or not math.isfinite(totals[0]):
                _raise_non_finite(epoch, steps_per_epoch - 1, out)
            row: dict[str, float] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train_{k}" if k != "weight" else "weight": v / seen for k, v in zip(TERMS, totals)})
            row["train_accuracy"] = totals[len(TERMS)] / seen
            for key in ("entropy_scale", "alpha", "expert_level"):  # method-specific scalars, last value of the epoch
                if key in out:
                    row[key] = float(out[key].detach().float())
            has_val = val_loader is not None and len(val_loader) > 0
            if has_val and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                ev = evaluate(student, val_loader, device, amp=amp, channels_last=channels_last)
                row["val_accuracy"], row["val_loss"] = ev["accuracy"], ev["loss"]
            row["seconds"] = epoch_seconds
            row["images_per_second"] = seen / epoch_seconds if epoch_seconds > 0 else float("nan")
            n_images += int(seen)
            t_train += epoch_seconds
            history.append(row)
            logger.info("%s epoch %d/%d %s", desc, epoch + 1, cfg.epochs, _fmt(row))
            bar.set_postfix(loss=f"{row['train_total']:.3f}", val=f"{row.get('val_accuracy', float('nan')):.3f}")
            for cb in callbacks:
                for name, value in row.items():
                    if name != "epoch":
                        cb(name, float(value), epoch + 1)
            if ckpt is not None:
                torch_save(
                    {
                        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch + 1,
                        "distiller": _trainable_state(distiller), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "schedule": distiller.schedule.state_dict(),
                        "loader": train_loader.state_dict() if hasattr(train_loader, "state_dict") else {},
                        "rng": _rng_state(), "history": history,
                    },
                    ckpt,
                )
    finally:
        bar.close()

    vals = [r["val_accuracy"] for r in history if "val_accuracy" in r]
    return FitResult(
        history=history,
        best_val_accuracy=max(vals) if vals else float("nan"),
        final_val_accuracy=vals[-1] if vals else float("nan"),
        epochs_run=len(history) - (resumed_from or 0),
        resumed_from_epoch=resumed_from,
        train_seconds=t_train,
        images_per_second=n_images / t_train if t_train > 0 else float("nan"),
    )


def _raise_non_finite(epoch: int, step_in_epoch: int, out: dict[str, torch.Tensor]) -> None:
    parts = ", ".join(f"{k}={float(out[k].detach()):.4g}" for k in TERMS if k in out)
    raise NonFiniteLossError(
        f"non-finite loss in epoch {epoch + 1} by step {step_in_epoch + 1} (last step: {parts}); "
        "lower the learning rate or the distillation weights, or check the input data"
    )


def _fmt(row: dict[str, float]) -> str:
    keys = ("train_total", "train_ce", "train_kd", "train_wasserstein", "train_grad_match", "weight",
            "train_accuracy", "val_accuracy")
    return " ".join(f"{k}={row[k]:.4f}" for k in keys if k in row)
