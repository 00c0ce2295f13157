"""A small CNN for the 8x8 sklearn digits (and any other size, thanks to global average pooling).

Three conv-BN-ReLU blocks with ``16w / 32w / 64w`` channels; the second and third downsample by 2
(8x8 -> 4x4 -> 2x2), then global average pooling and the classifier ``fc``. ``feature_dim = round(64 w)``.
At width 1 it has about 25k parameters, so a CPU epoch over digits takes well under a second.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import kaiming_init, scaled


def _block(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Conv(16w) -> Conv(32w, /2) -> Conv(64w, /2) -> global average pool -> ``fc``."""

    classifier_name = "fc"

    def __init__(self, num_classes: int, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = scaled(16, width), scaled(32, width), scaled(64, width)
        self.features = nn.Sequential(_block(in_channels, c1, 1), _block(c1, c2, 2), _block(c2, c3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = c3
        self.fc = nn.Linear(c3, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.fc(x)


def digits_cnn(num_classes: int, in_channels: int = 1, width: float = 1.0) -> DigitsCNN:
    """Small digits CNN; ``width`` scales every layer's channels."""
    return DigitsCNN(num_classes, in_channels, width)
