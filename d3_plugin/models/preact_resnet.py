"""Pre-activation ResNet-18 with BackdoorBench's state_dict layout (keys and shapes match its model zoo).

Layout: `conv1` (3x3, 64), `layer1`..`layer4` of two `PreActBlock`s each (`bn1, conv1, bn2, conv2`, plus a
1x1 `shortcut.0` conv when the block changes stride or width), `avgpool`, `linear` = Linear(512, C).
There is no BN/ReLU after `layer4`: the classifier sees the raw sum of the last block.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut taps the first pre-activation when it needs a projection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        identity = self.shortcut(pre) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + identity


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 (11.17 M parameters for 10 classes). `in_channels` other than 3 only changes the
    shape of `conv1.weight` (BackdoorBench itself always uses 3)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        widths, planes = (64, 128, 256, 512), 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(PreActBlock(planes, width, stride), PreActBlock(width, width)))
            planes = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))
