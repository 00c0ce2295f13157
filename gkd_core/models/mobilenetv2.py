"""MobileNetV2 (Sandler et al. 2018) for small images.

Layout follows the paper / torchvision (inverted residuals t,c,n,s; ReLU6; linear bottlenecks) with the
CIFAR adaptation used by RepDistiller and kuangliu's pytorch-cifar: a stride-1 stem and stride 1 in the
second stage, so a 32x32 input reaches the head at 4x4.

Width multiplier: stage channels are ``make_divisible(c * width, 8)`` (torchvision's rounding). The final
1x1 convolution -- the penultimate feature -- keeps **1280 channels for width <= 1** and is scaled only for
width > 1, exactly as RepDistiller's ``mobile_half`` (width 0.5, feature 1280) and torchvision do. So
``feature_dim`` is 1280 for the usual students and ``make_divisible(1280 * width, 8)`` above width 1.
The classifier is ``classifier`` (an ``nn.Linear``; dropout is not used, matching RepDistiller).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import kaiming_init, make_divisible

# t (expansion), c (output channels), n (repeats), s (first stride); stage 2 stride 1 for 32x32 inputs.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1), 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with a CIFAR stem; ``width`` scales the stage channels (see module docstring)."""

    classifier_name = "classifier"

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        stem = make_divisible(32 * width, 8)
        self.feature_dim: int = make_divisible(1280 * width, 8) if width > 1.0 else 1280
        layers: list[nn.Module] = [_conv_bn_relu6(in_channels, stem, 3, stride=1)]
        in_ch = stem
        for t, c, n, s in _SETTINGS:
            out_ch = make_divisible(c * width, 8)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(_conv_bn_relu6(in_ch, self.feature_dim, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenetv2(num_classes: int, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2; ``width=0.5`` is RepDistiller's ``mobile_half`` student (feature 1280)."""
    return MobileNetV2(num_classes, in_channels, width)
