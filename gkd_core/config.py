"""The whole params.yaml as pydantic models, validated before any compute.

``load_params(path)`` returns a :class:`Params` or raises :class:`ConfigError` whose message has one line
per bad field: ``<file>: <dotted.field> = <value>: <what is allowed>``. Unknown keys are refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASET_NAMES = ("digits", "fashion_mnist", "cifar10", "cifar100", "image_folder")
METHOD_NAMES = ("none", "kd", "linear", "cosine", "logistic", "gompertz", "dynamic_kd", "akd", "ces_kd")


class ConfigError(ValueError):
    """Invalid configuration; ``str(err)`` has one line per offending field."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


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
        from gkd_core.models import MODELS

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(sorted(MODELS))}")
        return v


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    lr_schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[float] = Field(
        default_factory=lambda: [150 / 240, 180 / 240, 210 / 240],
        description="multistep: fractions of training (0, 1) at which lr *= gamma",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
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


# --- method (schedule) parameters -------------------------------------------------------------------


class ConstantParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0, description="constant distillation weight")


class LinearParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0)
    warmup: float = Field(20 / 240, gt=0.0, le=1.0, description="fraction of training to reach a")


class CosineParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0)
    warmup: float = Field(0.5, gt=0.0, le=1.0)


class LogisticParams(Strict):
    a: float = Field(1.0, ge=0.0, le=100.0)
    k: float = Field(10.0, gt=0.0, le=1000.0, description="steepness")
    p0: float = Field(0.5, ge=0.0, le=1.0, description="midpoint as a fraction of training")


class GompertzParams(Strict):
    """w(p) = a*exp(-b*exp(-c*p)). Defaults: w0 = 0.01*a, inflection at p* = 0.3 (see docs/method.md)."""

    a: float = Field(1.0, gt=0.0, le=100.0, description="upper asymptote (saturation weight)")
    b: float = Field(round(-math.log(0.01), 4), gt=0.0, le=100.0, description="displacement: w0 = a*exp(-b)")
    c: float = Field(round(math.log(-math.log(0.01)) / 0.3, 4), gt=0.0, le=1000.0, description="growth rate")


class DynamicKDParams(Strict):
    """DynamicKD: constant weight a; a learnable student-logit scale (entropy controller) trained by KD only."""

    a: float = Field(1.0, ge=0.0, le=100.0)
    controller_lr_scale: float = Field(1.0, gt=0.0, le=100.0)


class AKDParams(Strict):
    """AKD: alpha from the teacher-student gap, alpha = 1 - exp(-beta * KL); context-aware teacher reweighting."""

    beta: float = Field(1.0, gt=0.0, le=100.0)
    cam_hidden: int = Field(64, ge=4, le=4096)


class CESKDParams(Strict):
    """CES-KD: per-image expert from a ladder of teacher assistants (smallest first) + the teacher."""

    a: float = Field(1.0, ge=0.0, le=100.0, description="constant distillation weight")
    assistants: list["ModelConfig"] = Field(
        default_factory=lambda: [ModelConfig(name="digits_cnn", width=1.0)],
        min_length=1, max_length=8, description="teacher assistants, smallest first (trained with CE first)",
    )
    pace: float = Field(0.5, gt=0.0, le=1.0, description="fraction of training by which the whole ladder is open")


class MethodConfig(Strict):
    name: Literal[METHOD_NAMES] = "gompertz"  # type: ignore[valid-type]
    progress: Literal["step", "epoch"] = Field("step", description="granularity of training progress p")
    kd: ConstantParams = Field(default_factory=ConstantParams)
    linear: LinearParams = Field(default_factory=LinearParams)
    cosine: CosineParams = Field(default_factory=CosineParams)
    logistic: LogisticParams = Field(default_factory=LogisticParams)
    gompertz: GompertzParams = Field(default_factory=GompertzParams)
    dynamic_kd: DynamicKDParams = Field(default_factory=DynamicKDParams)
    akd: AKDParams = Field(default_factory=AKDParams)
    ces_kd: CESKDParams = Field(default_factory=CESKDParams)

    def schedule_params(self) -> tuple[str, dict[str, Any]]:
        """(schedule registry name, its parameters) for the selected method."""
        if self.name == "none":
            return "none", {}
        if self.name == "dynamic_kd":
            return "kd", {"a": self.dynamic_kd.a}
        if self.name == "akd":
            return "kd", {"a": 1.0}
        if self.name == "ces_kd":
            return "kd", {"a": self.ces_kd.a}
        return self.name, getattr(self, self.name).model_dump()


class WassersteinConfig(Strict):
    method: Literal["sliced", "sinkhorn", "emd"] = "sliced"
    n_projections: int = Field(64, ge=1, le=4096, description="sliced: random directions")
    sinkhorn_reg: float = Field(0.05, gt=0.0, le=10.0, description="sinkhorn: entropic reg (cost normalised to max 1)")
    sinkhorn_iters: int = Field(100, ge=1, le=10_000)
    normalize_features: bool = Field(True, description="L2-normalise feature rows before the distance")


class GradMatchConfig(Strict):
    variant: Literal["input", "logit"] = Field("input", description="input: double backward; logit: cheap")
    every: int = Field(1, ge=1, le=10_000, description="apply every k steps (0 loss on other steps)")


class LossesConfig(Strict):
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1.0, ge=0.0, le=100.0)
    kd_weight: float = Field(1.0, ge=0.0, le=100.0, description="l_kd")
    wasserstein_weight: float = Field(1.0, ge=0.0, le=100.0, description="l_w")
    grad_match_weight: float = Field(1.0, ge=0.0, le=100.0, description="l_g")
    wasserstein: WassersteinConfig = Field(default_factory=WassersteinConfig)
    grad_match: GradMatchConfig = Field(default_factory=GradMatchConfig)


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
    progress_bar: bool = True

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


class PromoteConfig(Strict):
    metric: str = Field("test_accuracy", min_length=1)
    higher_is_better: bool = True
    min_improvement: float = Field(0.0, ge=0.0)


class Params(Strict):
    seed: int = Field(0, ge=0, le=2**31 - 1)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: NetConfig
    student: NetConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    losses: LossesConfig = Field(default_factory=LossesConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    @model_validator(mode="after")
    def _teacher_cache_is_possible(self) -> "Params":
        if not self.runtime.cache_teacher:
            return self
        problems = []
        gm = self.losses.grad_match
        if self.losses.grad_match_weight > 0 and gm.variant == "input":
            problems.append(
                "losses.grad_match.variant = 'input' with grad_match_weight > 0 needs the teacher's input "
                "gradient on every matched step, which cannot be cached (use variant 'logit' or weight 0)"
            )
        tr = self.student.train
        if tr.augment and (tr.crop_padding > 0 or tr.hflip):
            problems.append(
                "student.train.augment = true: cached teacher outputs are per image, not per augmented view "
                "(set student.train.augment: false)"
            )
        if problems:
            raise ValueError("runtime.cache_teacher = true is refused: " + "; ".join(problems))
        return self


def format_validation_error(err: ValidationError, source: str = "params") -> list[str]:
    """One line per error: ``source: field.path = value: message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {loc}: unknown key (not allowed here; check the spelling)")
        elif e["type"] == "missing":
            lines.append(f"{source}: {loc}: required field is missing")
        elif not e["loc"]:  # a check across sections (the message names the fields)
            lines.append(f"{source}: {msg}")
        else:
            value = e.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            lines.append(f"{source}: {loc} = {shown}: {msg}")
    return lines


def validate_params(data: Any, source: str = "params") -> Params:
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"])
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_params(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Params:
    """Read and validate a params.yaml. ``overrides`` maps dotted keys to values (``{"method.name": "kd"}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: params file not found"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from None
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate_params(data, str(path))


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {key}: {part} is not a section"])
    node[leaf] = value
