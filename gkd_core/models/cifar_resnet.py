"""CIFAR ResNets (He et al. 2016, section 4.2) as used in the KD literature (RepDistiller, mdistiller).

A 3x3 stem and three stages of BasicBlocks, ``n = (depth - 2) / 6`` blocks per stage, strides 1/2/2, global
average pooling and one linear classifier ``fc``. ``resnet20``/``resnet56`` use widths 16/16/32/64
(feature 64); the ``x4`` variants use 32/64/128/256 (feature 256). Shortcuts that change shape use a 1x1
convolution + BN (option B), as RepDistiller does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import kaiming_init


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet of the given depth (6n + 2) and stage widths ``(stem, stage1, stage2, stage3)``."""

    classifier_name = "fc"

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet8x4(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 with 4x widths (32/64/128/256), feature 256: the usual KD student."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes, in_channels)


def resnet32x4(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 with 4x widths (32/64/128/256), feature 256: the usual KD teacher."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes, in_channels)


def resnet20(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (16/16/32/64), feature 64."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (16/16/32/64), feature 64."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes, in_channels)
