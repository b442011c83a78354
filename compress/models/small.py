"""Small convolutional families that exercise every coupling structured pruning must handle:

* ``vgg_small`` -- plain conv/BatchNorm stacks (Simonyan & Zisserman 2015, with BN);
* ``mobilenet_small`` -- depthwise-separable blocks (Howard et al., MobileNets, 2017): grouped convs
  whose channels are tied to their input;
* ``squeezenet_small`` -- fire modules (Iandola et al., SqueezeNet, 2016): concatenation of a 1x1
  and a 3x3 expand branch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.models._registry import register_model


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class VGGSmall(nn.Module):
    def __init__(self, cfg, num_classes=10, in_channels=1):
        super().__init__()
        layers, cin = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, v))
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.dw = conv_bn(cin, cin, 3, stride, groups=cin)
        self.pw = conv_bn(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class MobileNetSmall(nn.Module):
    def __init__(self, num_classes=10, in_channels=1, width=1.0):
        super().__init__()
        c = lambda v: max(1, int(round(v * width)))  # noqa: E731
        cfg = [(c(32), 1), (c(64), 2), (c(64), 1), (c(128), 2), (c(128), 1)]
        self.stem = conv_bn(in_channels, c(16), 3)
        blocks, cin = [], c(16)
        for cout, s in cfg:
            blocks.append(DepthwiseSeparable(cin, cout, s))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNetSmall(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True))
        self.fire1 = Fire(32, 8, 32)
        self.fire2 = Fire(64, 16, 48)
        self.fire3 = Fire(96, 16, 64)
        self.classifier = nn.Conv2d(128, num_classes, 1)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = F.max_pool2d(self.fire2(self.fire1(x)), 2)
        x = self.fire3(x)
        return F.adaptive_avg_pool2d(self.classifier(x), 1).flatten(1)


@register_model
def vgg_small(num_classes=10, in_channels=1, width=1.0):
    """Small VGG with BatchNorm: 32-M-64-M-128-128-M, global pool, linear."""
    c = lambda v: max(1, int(round(v * width)))  # noqa: E731
    return VGGSmall([c(32), "M", c(64), "M", c(128), c(128), "M"], num_classes, in_channels)


@register_model
def mobilenet_small(num_classes=10, in_channels=1, width=1.0):
    """MobileNet-style net of 5 depthwise-separable blocks."""
    return MobileNetSmall(num_classes, in_channels, width)


@register_model
def squeezenet_small(num_classes=10, in_channels=1):
    """SqueezeNet-style net of 3 fire modules (concatenating expand branches)."""
    return SqueezeNetSmall(num_classes, in_channels)
