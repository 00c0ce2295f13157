"""Model registry and penultimate-feature hooks.

``MODELS`` maps a name to a :class:`ModelSpec`; :func:`build_model` builds one. Every model

* returns logits only from ``forward`` (so export and inference stay plain),
* has its final ``nn.Linear`` under the attribute ``MODELS[name].classifier`` (also the model's
  ``classifier_name``), whose *input* is the penultimate feature vector of width ``model.feature_dim``,
* ends in global average pooling + ``torch.flatten``, so any input size works (8x8, 28x28, 32x32, ...) and
  channels_last inputs need no special handling.

:class:`FeatureHook` reads those features with a forward pre-hook on the classifier, never by rewriting the
model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .cifar_resnet import CifarResNet, resnet8x4, resnet20, resnet32x4, resnet56
from .digits_cnn import DigitsCNN, digits_cnn
from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet, resnet18, resnet50

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "ModelSpec",
    "FeatureHook",
    "build_model",
    "classifier_of",
    "count_parameters",
    "CifarResNet",
    "ResNet",
    "MobileNetV2",
    "DigitsCNN",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registry model.

    ``ctor(num_classes=..., in_channels=...[, width=...])`` builds it; ``classifier`` is the attribute name of
    its final ``nn.Linear``; ``supports_width`` says whether ``ctor`` takes a width multiplier.
    """

    ctor: Callable[..., nn.Module]
    classifier: str
    supports_width: bool = False


MODELS: dict[str, ModelSpec] = {
    "resnet8x4": ModelSpec(resnet8x4, "fc"),
    "resnet32x4": ModelSpec(resnet32x4, "fc"),
    "resnet20": ModelSpec(resnet20, "fc"),
    "resnet56": ModelSpec(resnet56, "fc"),
    "resnet18": ModelSpec(resnet18, "fc"),
    "resnet50": ModelSpec(resnet50, "fc"),
    "mobilenetv2": ModelSpec(mobilenetv2, "classifier", supports_width=True),
    "digits_cnn": ModelSpec(digits_cnn, "fc", supports_width=True),
}


def build_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build registry model ``name`` with ``num_classes`` outputs for ``in_channels``-channel images.

    Raises ``ValueError`` for an unknown name (listing the allowed ones), a width other than 1 on a model
    without a width multiplier, or non-positive sizes.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if not float(width) > 0.0:
        raise ValueError(f"width must be > 0, got {width!r}")
    spec = MODELS[name]
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
    if spec.supports_width:
        kwargs["width"] = float(width)
    elif float(width) != 1.0:
        allowed = sorted(n for n, s in MODELS.items() if s.supports_width)
        raise ValueError(
            f"model {name!r} has no width multiplier (got width={width!r}); "
            f"width is supported by: {', '.join(allowed)}"
        )
    model = spec.ctor(**kwargs)
    model.classifier_name = spec.classifier
    head = getattr(model, spec.classifier, None)
    if not isinstance(head, nn.Linear) or head.in_features != model.feature_dim:
        raise RuntimeError(f"model {name!r}: {spec.classifier!r} is not an nn.Linear over feature_dim")
    logger.debug(
        "built %s (classes=%d, in_channels=%d, width=%s, params=%d)",
        name, num_classes, in_channels, width, count_parameters(model),
    )
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind ``torch.compile`` (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model)


def classifier_of(model: nn.Module, name: str | None = None) -> nn.Linear:
    """The final ``nn.Linear`` of ``model``: attribute ``name``, else ``model.classifier_name``."""
    model = _unwrap(model)
    name = name if name is not None else getattr(model, "classifier_name", None)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} has no 'classifier_name'; pass the classifier attribute name explicitly"
        )
    head = getattr(model, name, None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}.{name} is {type(head).__name__}, not an nn.Linear")
    return head


class FeatureHook:
    """Capture the penultimate features (the classifier's input) of every forward pass.

    ``features`` holds the last batch's input to the classifier, shape ``(B, feature_dim)``, *not* detached
    (so feature losses can backpropagate into the model); ``None`` before the first forward. Use as a context
    manager or call :meth:`remove`. ``classifier`` overrides the attribute name (default:
    ``model.classifier_name``, set by :func:`build_model` and by every registry model class).
    """

    def __init__(self, model: nn.Module, classifier: str | None = None) -> None:
        self.module = classifier_of(model, classifier)
        self.features: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = self.module.register_forward_pre_hook(
            self._hook
        )

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0]

    @property
    def attached(self) -> bool:
        """Whether the hook is still registered."""
        return self._handle is not None

    def remove(self) -> None:
        """Detach the hook (idempotent); ``features`` keeps the last captured batch."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "FeatureHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __deepcopy__(self, memo: dict[int, Any]) -> "FeatureHook":
        # Reached when a model with an attached hook is deep-copied: the copy gets an empty, detached
        # recorder instead of trying to copy a captured (non-leaf) tensor.
        new = FeatureHook.__new__(FeatureHook)
        new.module = memo.get(id(self.module), self.module)
        new.features = None
        new._handle = None
        return new


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
