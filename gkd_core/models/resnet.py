"""ImageNet-family ResNets (torchvision layout) adapted to small images.

Same stages as torchvision's ResNet-18/50 (widths 64/128/256/512, BasicBlock or Bottleneck with the stride
on the 3x3 convolution, "ResNet v1.5"), but with a 3x3 stride-1 stem and no max-pool, as is customary for
32x32 inputs. The classifier is ``fc``; features are 512 (ResNet-18) or 2048 (ResNet-50).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import kaiming_init
from .cifar_resnet import BasicBlock


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with an identity or 1x1 projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-style ResNet with a CIFAR stem (3x3/1 conv, no max-pool)."""

    classifier_name = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-18 (BasicBlock, 2/2/2/2), feature 512."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


def resnet50(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-50 (Bottleneck, 3/4/6/3), feature 2048."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
