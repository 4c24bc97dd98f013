"""Small CPU-friendly models for demos and tests."""
from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks and a two-layer head (`fc`, `linear`): 28 k parameters (width 16), fast on a CPU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(in_channels, width), nn.MaxPool2d(2),
                                      block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, 4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.linear(self.relu(self.fc(self.features(x))))
