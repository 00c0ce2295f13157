"""High-level recipes over the library: train a teacher, distil a student, evaluate, save and load models.

The CLI (``gkd``) and the pipeline's stage tasks both call these functions, so each step has one
implementation. Everything here takes validated :class:`~gkd_core.config.Params` and plain paths.

Under torchrun the training recipes join the process group (:func:`gkd_core.distributed.init_from_env`) and
train as one of its ranks: each rank loads its share of every epoch, the student trains under DDP, and every
rank returns the same trained model; writing it is the caller's business (rank 0's, see ``distributed.is_main``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from gkd_core import distributed
from gkd_core.config import MethodConfig, ModelConfig, NetConfig, ParamsBase
from gkd_core.data import DeviceLoader, Normalizer, PreparedData, make_loaders
from gkd_core.engine import (
    Callback,
    Checkpointing,
    FitOptions,
    config_fingerprint,
    fit,
    predict,
    resolve_device,
    seed_everything,
)
from gkd_core.methods import build_distiller, compute_teacher_cache, describe_objective, load_teacher_cache, method_spec
from gkd_core.metrics import classification_report
from gkd_core.modelfile import read_model, save_model
from gkd_core.schedules import Schedule
from gkd_core.models import build_model

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "train_teacher", "distill_student", "save_model", "load_model", "evaluate_model",
           "predict_split", "split_tensors", "normalise_images", "build_net"]

@dataclass
class RunResult:
    model: nn.Module  # the trained network, eval mode, on CPU
    history: list[dict[str, float]]
    best_model: Optional[nn.Module] = None  # the same network at its best validation epoch (None: no validation)
    schedule: Optional[Schedule] = None  # the distillation weight as trained (an adaptive one: its final timing)
    summary: dict[str, Any] = field(default_factory=dict)


def build_net(model_cfg: ModelConfig, data: PreparedData) -> nn.Module:
    return build_model(model_cfg.name, num_classes=data.num_classes, in_channels=data.in_channels,
                       width=model_cfg.width)


def _train(
    params: ParamsBase, data: PreparedData, net_cfg: NetConfig, method: Any, teacher: Optional[nn.Module],
    checkpoint_path: str | Path | None, callbacks: Sequence[Callback], resume: bool, desc: str,
    stop_after_epochs: Optional[int] = None, on_checkpoint: Optional[Callable[[Path], None]] = None,
    teacher_cache: Optional[tuple[Path, dict[str, Any]]] = None,
) -> RunResult:
    """Train ``net_cfg``'s network under ``method`` (a ``method`` section; its registry spec decides the rest).
    ``teacher_cache`` (a file and what it must have been computed from) replaces computing the cache when
    ``runtime.cache_teacher`` is on and the file matches."""
    rt = params.runtime
    device = distributed.init_from_env(resolve_device(rt.device))  # a no-op without torchrun
    rank, world = distributed.rank(), distributed.world_size()
    seed_everything(params.seed, rt.deterministic, device)
    student = build_net(net_cfg.model, data)
    sync_bn = world > 1 and rt.sync_batchnorm
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("runtime.sync_batchnorm needs CUDA: torch.nn.SyncBatchNorm has no CPU kernels "
                             "(set it false: each process then normalises over its own share of the batch)")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    spec = method_spec(method.name)
    if not spec.needs_teacher:
        teacher = None
    if teacher is not None:
        teacher = teacher.to(device)

    def train_alone(model_cfg: ModelConfig, label: str) -> nn.Module:
        """A helper network of the method (e.g. a CES-KD assistant): trained alone with CE on the student's
        budget and seed, never checkpointed."""
        net = NetConfig(model=model_cfg, train=net_cfg.train)
        result = _train(params, data, net, _ALONE, None, None, (), False, label)
        logger.info("%s (%s x%.2g): val %.4f", label, model_cfg.name, model_cfg.width,
                    result.summary["final_val_accuracy"])
        return result.model

    def val_accuracy(net: nn.Module) -> float:
        logits, y = predict_split(net, data, "val", str(device))
        return float((logits.argmax(-1) == y).float().mean())

    distiller = build_distiller(method, params.losses, student, teacher,
                                label_smoothing=net_cfg.train.label_smoothing, seed=params.seed,
                                train_alone=train_alone, val_accuracy=val_accuracy)
    use_cl = rt.channels_last and device.type == "cuda"
    # validated in config: cache_teacher comes with augmentation off and no input-gradient matching
    cache = rt.cache_teacher and teacher is not None and distiller.distill
    train_loader, val_loader, _ = make_loaders(
        data, net_cfg.train, rt.loader, device, seed=params.seed, num_workers=rt.num_workers, channels_last=use_cl,
        with_index=cache, rank=rank, world_size=world, with_test=False,
    )
    if cache:
        assert teacher is not None
        if use_cl:
            teacher.to(memory_format=torch.channels_last)
        given = None
        if teacher_cache is not None:
            given = load_teacher_cache(teacher_cache[0], teacher_cache[1], int(data.train_x.shape[0]), device,
                                       features=distiller.use_wasserstein)
        distiller.attach_teacher_cache(given or compute_teacher_cache(
            teacher, data.train_x, data.mean, data.std, device, amp=rt.amp, channels_last=use_cl,
            features=distiller.use_wasserstein,
        ))
    fingerprint = run_fingerprint(desc, net_cfg, method, params, data)
    options = FitOptions(
        device=device, amp=rt.amp, channels_last=use_cl,
        compile=rt.compile is True or (rt.compile == "auto" and device.type == "cuda"),
        progress=method.progress, progress_bar=rt.progress_bar if rank == 0 else False, desc=desc, callbacks=callbacks,
        checkpoint=Checkpointing(Path(checkpoint_path), fingerprint, resume, on_checkpoint) if checkpoint_path else None,
        stop_after_epochs=stop_after_epochs,
    )
    try:
        result = fit(distiller, train_loader, val_loader, net_cfg.train, options)
    finally:
        train_loader.close()  # worker processes of the DataLoader path end with the run, not at GC
        val_loader.close()
    distiller.remove_hooks()  # the returned network is plain: no feature hooks left for export/serving
    distiller.attach_teacher_cache(None)
    student = distiller.student.to("cpu").eval()
    if sync_bn:  # the same weights in the plain network (BatchNorm2d), for saving, evaluation and export
        plain = build_net(net_cfg.model, data)
        plain.load_state_dict(student.state_dict())
        student = plain.eval()
    if use_cl:
        student = student.to(memory_format=torch.contiguous_format)
        if teacher is not None:
            teacher.to(memory_format=torch.contiguous_format)  # the caller's module, as it was handed in
    best_model = None
    if result.best_state is not None:
        best_model = build_net(net_cfg.model, data)
        best_model.load_state_dict(result.best_state)
        best_model.eval()
    summary = {
        "best_val_accuracy": result.best_val_accuracy,
        "best_val_epoch": result.best_val_epoch,
        "final_val_accuracy": result.final_val_accuracy,
        "epochs": net_cfg.train.epochs,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "method": method.name if teacher is not None else "none",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),  # CPU kernels' threads: part of what a CPU run repeats under
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    if world > 1:
        summary["processes"] = world
    if net_cfg.train.lr_schedule == "plateau":  # "epochs" is the cap; these say where the plateau ended it
        summary["epochs_trained"] = len(result.history)
        summary["stopped_at_epoch"] = result.stopped_at_epoch
    summary["objective"] = describe_objective(method) if teacher is not None else "CE"
    return RunResult(model=student, history=result.history, best_model=best_model, schedule=distiller.schedule,
                     summary=summary)


_ALONE = MethodConfig(name="none")  # a network trained alone: cross-entropy, no teacher


def run_fingerprint(desc: str, net_cfg: Any, method: Any, params: ParamsBase, data: PreparedData) -> str:
    """What a training run's checkpoint must match to be resumed: the network's section, the method, the seed,
    the data, and the ``losses`` section only for a method with distillation terms (a teacher, or the student
    alone, resumes after an edit of ``losses``)."""
    losses = params.losses.model_dump() if method_spec(method.name).terms else None
    return config_fingerprint(desc, net_cfg.model_dump(), method.model_dump(), losses, params.seed,
                              data.meta.get("sha256"))


def train_teacher(
    params: ParamsBase, data: PreparedData, checkpoint_path: str | Path | None = None,
    callbacks: Sequence[Callback] = (), resume: bool = True, stop_after_epochs: Optional[int] = None,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
) -> RunResult:
    """Train ``params.teacher`` on the prepared data with cross-entropy alone (``on_checkpoint`` is told after
    each epoch's checkpoint is written)."""
    return _train(params, data, params.teacher, _ALONE, None, checkpoint_path, callbacks, resume, "teacher",
                  stop_after_epochs, on_checkpoint)


def distill_student(
    params: ParamsBase, data: PreparedData, teacher: Optional[nn.Module], checkpoint_path: str | Path | None = None,
    callbacks: Sequence[Callback] = (), resume: bool = True, method: Any = None,
    stop_after_epochs: Optional[int] = None, on_checkpoint: Optional[Callable[[Path], None]] = None,
    teacher_cache: Optional[tuple[Path, dict[str, Any]]] = None,
) -> RunResult:
    """Train ``params.student`` under ``params.method`` (or ``method``, another ``method`` section) with the
    frozen ``teacher`` (ignored by a method that trains the student alone); ``teacher_cache``: a saved cache
    of that teacher's outputs (:func:`gkd_core.methods.teacher_cache.save_teacher_cache`) and its expected meta."""
    method = method or params.method
    return _train(params, data, params.student, method, teacher, checkpoint_path, callbacks, resume,
                  f"student[{method.name}]", stop_after_epochs, on_checkpoint, teacher_cache)


def load_model(path: str | Path) -> tuple[nn.Module, Any]:
    """A model file as ``(network in eval mode on CPU, its ModelMeta)``; see :mod:`gkd_core.modelfile`."""
    return read_model(path)


def split_tensors(data: PreparedData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    return getattr(data, f"{split}_x"), getattr(data, f"{split}_y")


def predict_split(model: nn.Module, data: PreparedData, split: str = "test", device: str = "auto",
                  batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a split (normalised with the training statistics, no augmentation)."""
    dev = resolve_device(device)
    x, y = split_tensors(data, split)
    loader = DeviceLoader(x, y, data.mean, data.std, batch_size=batch_size, shuffle=False, augment=False,
                          drop_last=False, device=dev)
    return predict(model.to(dev), loader, dev)


def evaluate_model(model: nn.Module, data: PreparedData, split: str = "test", teacher: Optional[nn.Module] = None,
                   device: str = "auto") -> dict[str, Any]:
    """Accuracy, top-5, ECE, per-class accuracy, confusion matrix (and teacher agreement) on a split."""
    logits, y = predict_split(model, data, split, device)
    teacher_logits = predict_split(teacher, data, split, device)[0] if teacher is not None else None
    report = classification_report(logits, y, data.num_classes, teacher_logits=teacher_logits)
    report["split"] = split
    report["n"] = int(len(y))
    return report


def normalise_images(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32 normalised exactly as the loaders do (for export examples and serving)."""
    return Normalizer(mean, std, x_uint8.shape[1], x_uint8.device)(x_uint8)
