"""Shared building blocks for the model zoo: initialisation and width scaling."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) for convolutions, unit/zero for norms, small normal for linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going more than 10% below it."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))
