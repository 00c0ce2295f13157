"""The sections of params.yaml as pydantic models (dataset, networks, losses, runtime, export, MLflow,
promotion), plus the strict base every model of the configuration uses.

:mod:`gkd_core.config` assembles them, with each method's own block from the methods registry, into
:class:`~gkd_core.config.Params`. This module imports no method code, so the methods can use these models
(their parameter blocks subclass :class:`Strict`; CES-KD's assistants are :class:`ModelConfig`).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gkd_core.models import MODELS

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "cifar100", "image_folder")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Strict):
    name: Literal[DATASET_NAMES] = "digits"  # type: ignore[valid-type]
    root: Optional[str] = Field(None, description="directory or archive (fashion_mnist, cifar*, image_folder)")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="share of the training split held out")
    download: bool = Field(False, description="cifar* only: let torchvision download into root")
    image_size: Optional[int] = Field(None, ge=8, le=512, description="image_folder: resize to this square size")
    limit: Optional[int] = Field(None, ge=10, description="keep only the first N training images (smoke runs)")

    @model_validator(mode="after")
    def _root_needed(self) -> "DatasetConfig":
        if self.name != "digits" and not self.root:
            raise ValueError(f"dataset.root is required for dataset {self.name!r} (a directory or archive path)")
        if self.download and not self.name.startswith("cifar"):
            raise ValueError("dataset.download is only supported for cifar10/cifar100")
        return self


class ModelConfig(Strict):
    name: str
    width: float = Field(1.0, gt=0.0, le=8.0, description="width multiplier (mobilenetv2, digits_cnn)")

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(sorted(MODELS))}")
        return v


class PlateauConfig(Strict):
    """``lr_schedule: plateau``: train until validation accuracy stops improving (see :class:`TrainConfig`)."""

    patience: int = Field(3, ge=1, le=1000, description="evaluations without an improvement that make a plateau")
    min_delta: float = Field(0.001, ge=0.0, lt=1.0, description="validation accuracy gain that counts as improving")
    reductions: int = Field(2, ge=0, le=20, description="plateaus answered by lr *= gamma; the next one stops training")


class TrainConfig(Strict):
    """A network's training recipe. ``epochs`` is the budget; with ``lr_schedule: plateau`` it is the cap: the
    learning rate holds (after the warm-up) until validation accuracy has not improved by ``plateau.min_delta``
    for ``plateau.patience`` evaluations, is then multiplied by ``gamma`` (``plateau.reductions`` times), and the
    plateau after the last reduction ends training (ReduceLROnPlateau, then stop)."""

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    lr_schedule: Literal["cosine", "multistep", "constant", "plateau"] = "cosine"
    milestones: list[float] = Field(
        default_factory=lambda: [150 / 240, 180 / 240, 210 / 240],
        description="multistep: fractions of training (0, 1) at which lr *= gamma",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="multistep and plateau: the lr factor of each cut")
    plateau: PlateauConfig = Field(default_factory=PlateauConfig)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    augment: bool = Field(True, description="random crop (reflect pad) + horizontal flip on the training split")
    crop_padding: int = Field(4, ge=0, le=64)
    hflip: bool = True
    eval_every: int = Field(1, ge=1, description="evaluate on the validation split every N epochs")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError(f"milestones must be increasing fractions of training in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        return self


class NetConfig(Strict):
    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


class WassersteinConfig(Strict):
    method: Literal["sliced", "sinkhorn", "emd"] = "sliced"
    n_projections: int = Field(64, ge=1, le=4096, description="sliced: random directions")
    sinkhorn_reg: float = Field(0.05, gt=0.0, le=10.0, description="sinkhorn: entropic reg (cost normalised to max 1)")
    sinkhorn_iters: int = Field(100, ge=1, le=10_000)
    normalize_features: bool = Field(True, description="L2-normalise feature rows before the distance")


class GradMatchConfig(Strict):
    variant: Literal["input", "logit"] = Field("input", description="input: double backward; logit: cheap")
    every: int = Field(1, ge=1, le=10_000, description="apply every k steps (0 loss on other steps)")


_MOVED_WEIGHT = (
    "moved: term weights belong to the method that uses them (kd is Hinton KD, CE + a*KD, with no W or GM); "
    "for the paper's objective set method.gompertz.weights.{kd,wasserstein,grad_match} "
    "(docs/method.md, 'Migrating a params file')"
)


class LossesConfig(Strict):
    """How the loss terms are computed (shared by every method); *which* terms a method uses, and their
    weights, are the method's own (``method.<name>``)."""

    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD temperature T")
    ce_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of the hard-label cross-entropy")
    wasserstein: WassersteinConfig = Field(default_factory=WassersteinConfig)
    grad_match: GradMatchConfig = Field(default_factory=GradMatchConfig)
    # params files written before term weights moved into the method blocks: refused with the mapping
    kd_weight: Optional[float] = Field(None, exclude=True, description=_MOVED_WEIGHT)
    wasserstein_weight: Optional[float] = Field(None, exclude=True, description=_MOVED_WEIGHT)
    grad_match_weight: Optional[float] = Field(None, exclude=True, description=_MOVED_WEIGHT)

    @field_validator("kd_weight", "wasserstein_weight", "grad_match_weight")
    @classmethod
    def _moved(cls, v: Optional[float]) -> None:
        if v is not None:
            raise ValueError(_MOVED_WEIGHT)
        return None


class RuntimeConfig(Strict):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="torch.compile student and teacher; auto = on CUDA only (compile warm-up is slow on CPU)"
    )
    loader: Literal["auto", "device", "torch"] = Field(
        "auto", description="device: whole split resident on the device; torch: DataLoader; auto: device if it fits"
    )
    num_workers: int = Field(2, ge=0, le=64, description="DataLoader workers (loader=torch)")
    cache_teacher: bool = Field(
        False,
        description="distillation: run the teacher once over the training split and reuse its logits and "
        "features every epoch (needs student.train.augment off; not with input-gradient matching)",
    )
    deterministic: bool = Field(True, description="deterministic algorithms on CPU")
    progress_bar: Union[bool, Literal["auto"]] = Field(
        "auto", description="rich progress bar during training; auto = when stderr is a terminal (epoch lines are "
        "logged either way)")
    nproc: int = Field(
        1, ge=1, le=1024,
        description="processes for the training stages (one per GPU): > 1 relaunches the stage under torchrun "
        "with DistributedDataParallel; train.batch_size stays the global batch of one step and must divide by it",
    )
    sync_batchnorm: bool = Field(
        False,
        description="with several processes: the student's BatchNorm normalises over the global batch "
        "(torch.nn.SyncBatchNorm, CUDA only); false: each process over its own share",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")


class ExportConfig(Strict):
    opset: int = Field(18, ge=13, le=23)
    tolerance: float = Field(1e-4, gt=0.0, le=1.0, description="max abs logit difference onnxruntime vs torch")


class MlflowConfig(Strict):
    experiment: str = Field("gkd-pipeline", min_length=1)
    registered_model_name: str = Field("gkd-student", min_length=1)


class TimeoutsConfig(Strict):
    """Time limits of the orchestration, in seconds (flows/: the library itself never stops a computation).
    A run past its limit ends with a cause that says which limit it hit."""

    gpu_stage: int = Field(21600, ge=1, description="wait for one stage or sweep point sent to the gpu pool; "
                                                       "past it the run is cancelled and the parent fails")
    pipeline: int = Field(86400, ge=1, description="one pipeline flow run, end to end")
    sweep: int = Field(259200, ge=1, description="one sweep flow run, end to end")
    promote: int = Field(1800, ge=1, description="one promotion flow run, waiting for the promotion slot included")


class PromoteConfig(Strict):
    """Promotion: floors every candidate must clear (the first champion too), then the comparison with the
    champion on ``metric``."""

    metric: str = Field("test_accuracy", min_length=1, description="a metric of reports/evaluate.json")
    higher_is_better: bool = True
    min_improvement: float = Field(0.0, ge=0.0, description="the challenger must beat the champion by at least this")
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="floor on the candidate's test accuracy")
    min_above_chance: float = Field(
        0.1, ge=0.0, le=1.0, description="test accuracy must exceed chance (1 / classes) by at least this")
    max_below_teacher: Optional[float] = Field(
        0.25, ge=0.0, le=1.0, description="test accuracy may trail the teacher's by at most this (null: no check)")
