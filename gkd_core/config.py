"""The whole params.yaml as pydantic models, validated before any compute.

The sections (dataset, teacher, student, losses, runtime, export, mlflow, promote, timeouts) are in
:mod:`gkd_core.sections`; the ``method`` section is assembled here from the methods registry
(:data:`gkd_core.methods.METHODS`): ``method.name`` is one of the registered names and every registered method
with parameters has its own block ``method.<name>`` validated by the model its spec declares. A method added to
the registry is therefore configurable without touching this module.

``load_params(path)`` returns a :class:`Params` or raises :class:`ConfigError` whose message has one line
per bad field: ``<file>: <dotted.field> = <value>: <what is allowed>``. Unknown keys are refused.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from gkd_core.methods import METHODS, MethodSpec, method_weights
from gkd_core.sections import (
    DATASET_NAMES,
    DatasetConfig,
    ExportConfig,
    GradMatchConfig,
    LossesConfig,
    MlflowConfig,
    ModelConfig,
    NetConfig,
    PromoteConfig,
    TimeoutsConfig,
    RuntimeConfig,
    Strict,
    TrainConfig,
    WassersteinConfig,
)

__all__ = [
    "Params", "ParamsBase", "MethodConfig", "ConfigError", "load_params", "validate_params", "params_model",
    "format_validation_error", "apply_overrides", "set_dotted", "DATASET_NAMES", "DatasetConfig", "ExportConfig", "GradMatchConfig",
    "LossesConfig", "MlflowConfig", "ModelConfig", "NetConfig", "PromoteConfig", "RuntimeConfig", "Strict", "TimeoutsConfig",
    "TrainConfig", "WassersteinConfig",
]

DEFAULT_METHOD = "gompertz"


class ConfigError(ValueError):
    """Invalid configuration; ``str(err)`` has one line per offending field."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class MethodBase(Strict):
    """The fields every ``method`` section has; the registry adds ``name`` and one block per method."""

    progress: Literal["step", "epoch"] = Field("step", description="granularity of training progress p")


class ParamsBase(Strict):
    """Every section but ``method`` (which depends on the registry: see :func:`params_model`)."""

    seed: int = Field(0, ge=0, le=2**31 - 1)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    teacher: NetConfig
    student: NetConfig
    losses: LossesConfig = Field(default_factory=LossesConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)

    @model_validator(mode="after")
    def _processes_can_share_the_work(self) -> "ParamsBase":
        rt, problems = self.runtime, []
        for section in ("teacher", "student"):
            batch = getattr(self, section).train.batch_size
            if rt.nproc > 1 and batch % rt.nproc:
                problems.append(
                    f"{section}.train.batch_size = {batch} is not a multiple of runtime.nproc = {rt.nproc} (the batch "
                    "size is the global batch of one optimizer step; each process takes batch_size / nproc images)"
                )
        method = getattr(self, "method", None)
        gm_weight = method_weights(method).get("grad_match", 0.0) if method is not None else 0.0
        if rt.sync_batchnorm and gm_weight > 0 and self.losses.grad_match.variant == "input":
            problems.append(
                "runtime.sync_batchnorm = true with input-gradient matching (losses.grad_match.variant = 'input'): "
                "torch.nn.SyncBatchNorm has no double backward (its backward all-reduces outside autograd); use "
                "variant 'logit' or sync_batchnorm false"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _student_has_a_budget(self) -> "ParamsBase":
        if self.student.train.lr_schedule == "plateau":
            raise ValueError(
                "student.train.lr_schedule = 'plateau' is for a network trained alone (the teacher): a student's "
                "distillation weight w(p) is a function of training progress p = step / total steps, which needs "
                "a known budget (student.train.epochs); allowed: cosine, multistep, constant (docs/method.md, "
                "'Training budgets')"
            )
        return self

    @model_validator(mode="after")
    def _teacher_cache_is_possible(self) -> "ParamsBase":
        if not self.runtime.cache_teacher:
            return self
        problems = []
        method = getattr(self, "method", None)
        gm_weight = method_weights(method).get("grad_match", 0.0) if method is not None else 0.0
        if gm_weight > 0 and self.losses.grad_match.variant == "input":
            problems.append(
                f"method {method.name!r} uses input-gradient matching (losses.grad_match.variant = 'input'), "
                "which needs the teacher's input gradient on every matched step and cannot be cached "
                "(use variant 'logit', or a method without gradient matching)"
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


@functools.lru_cache(maxsize=8)
def _build_params_model(specs: tuple[tuple[str, MethodSpec], ...]) -> type[ParamsBase]:
    names = tuple(name for name, _ in specs)
    fields: dict[str, Any] = {
        "name": (Literal[names], Field(DEFAULT_METHOD if DEFAULT_METHOD in names else names[0],  # type: ignore[valid-type]
                                      description="the distillation method (gkd_core.methods.METHODS)")),
    }
    for name, spec in specs:
        if spec.params is not None:
            fields[name] = (spec.params, Field(default_factory=spec.params, description=spec.summary))
    method_config = create_model("MethodConfig", __base__=MethodBase, **fields)
    return create_model("Params", __base__=ParamsBase,
                        method=(method_config, Field(default_factory=method_config)))


def params_model() -> type[ParamsBase]:
    """The :class:`Params` model for the methods registered now (rebuilt when the registry changes)."""
    return _build_params_model(tuple(METHODS.items()))


Params = params_model()
MethodConfig = Params.model_fields["method"].annotation


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


def validate_params(data: Any, source: str = "params") -> ParamsBase:
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of sections, got {type(data).__name__}"])
    try:
        return params_model().model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_params(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> ParamsBase:
    """Read and validate a params.yaml. ``overrides`` maps dotted keys to values (``{"method.name": "kd"}``),
    applied with :func:`apply_overrides`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: params file not found"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from None
    return validate_params(apply_overrides(data, overrides or {}), str(path))


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (not modified) with dotted-key ``overrides``, the one meaning of ``-S`` everywhere (``gkd``, the
    stage CLIs, the sweep's presets and ``-S``): a scalar or list replaces the value the key names; a mapping
    is merged into the section the key names, recursively, so ``student.train={epochs: 3}`` changes the
    epochs and keeps the section's other fields (as ``student.train.epochs=3`` does)."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        set_dotted(out, key, copy.deepcopy(value))
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted) in ``data`` in place; a mapping ``value`` merges into an existing section."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {key}: {part} is not a section"])
    if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
        _merge_into(node[leaf], value)
    else:
        node[leaf] = value


def _merge_into(section: dict[str, Any], value: Mapping[str, Any]) -> None:
    for key, sub in value.items():
        if isinstance(sub, Mapping) and isinstance(section.get(key), dict):
            _merge_into(section[key], sub)
        else:
            section[key] = sub
