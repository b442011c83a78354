"""LeNet-300-100 and LeNet-5 (Caffe variant), as used by Han et al., "Learning both Weights and
Connections for Efficient Neural Networks" (NeurIPS 2015) and "Deep Compression" (ICLR 2016).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.models._registry import register_model


class LeNet300(nn.Module):
    """Fully connected 784-300-100-10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):  # (N, C, H, W) -> (N, classes)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe LeNet: conv5x5(20) - pool - conv5x5(50) - pool - fc500 - fc; 431,080 params at 28x28."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((input_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):  # (N, 1, 28, 28)
        x = F.max_pool2d(self.conv1(x), 2)  # (N, 20, 12, 12)
        x = F.max_pool2d(self.conv2(x), 2)  # (N, 50, 4, 4)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@register_model
def lenet300(num_classes=10, in_channels=1, input_size=28):
    """LeNet-300-100, fully connected (266,610 params on MNIST)."""
    return LeNet300(num_classes, in_channels, input_size)


@register_model
def lenet5(num_classes=10, in_channels=1, input_size=28):
    """LeNet-5, Caffe variant (431,080 params on MNIST)."""
    return LeNet5(num_classes, in_channels, input_size)
