"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016):
three stages of n basic blocks, widths 16/32/64 (times a width multiplier), 6n+2 layers.

Shortcuts that change shape are 1x1 conv + BatchNorm (option B) so that the dependency graph of
structured pruning couples every layer that shares a stage's channels.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from compress.models._registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        widths = [max(1, int(round(w * width))) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # (N, C, 32, 32)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64w, 8, 8)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


_VARIANTS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet56": 56}


def _make(depth):
    def factory(num_classes=10, in_channels=1, width=1.0):
        return ResNet(depth, num_classes, in_channels, width)

    return factory


for _name, _depth in _VARIANTS.items():
    _f = _make(_depth)
    _f.__name__ = _name
    _f.__doc__ = f"CIFAR ResNet-{_depth}, widths 16/32/64 x width (width=0.5 for 8/16/32)."
    register_model(_f)
