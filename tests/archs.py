"""Reference architectures in the layout of libraries that do not import here (torchvision's compiled
ops do not load beside the CPU build of torch): the same modules, names and forward code, at a
small size. They are the user's classes: neither torch.nn nor compress ones."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d: LayerNorm over channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    """torchvision.models.convnext.CNBlock: depthwise 7x7, channels-last LayerNorm, a pointwise MLP
    of two Linears, layer scale (a bare Parameter) and the residual add."""

    def __init__(self, dim, layer_scale=1e-6):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        return self.layer_scale * self.block(x) + x


class ConvNeXt(nn.Module):
    """torchvision.models.convnext.ConvNeXt's layout: patchify stem, stages of CNBlocks, LayerNorm +
    strided-conv downsampling, LayerNorm2d-Flatten-Linear head."""

    def __init__(self, dims=(24, 48, 96, 192), depths=(1, 1, 3, 1), num_classes=10, layer_scale=1e-6):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (d, n) in enumerate(zip(dims, depths, strict=False)):
            layers.append(nn.Sequential(*[CNBlock(d, layer_scale) for _ in range(n)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_mini():
    """A small ConvNeXt whose layer scales are ~1 (as after training), so every branch matters."""
    torch.manual_seed(0)
    return ConvNeXt(layer_scale=1.0)


class TinyViT(nn.Module):
    """The ViT pattern: patch conv, a transformer encoder layer (MultiheadAttention, LayerNorm, MLP),
    mean over tokens, head."""

    def __init__(self, width=64, heads=4, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, 4)
        self.enc = nn.TransformerEncoderLayer(width, heads, 2 * width, batch_first=True)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.enc(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def tiny_vit():
    torch.manual_seed(0)
    return TinyViT().eval()


class TinyCNN(nn.Module):
    """A small residual convnet of the user's own class."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + torch.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()
