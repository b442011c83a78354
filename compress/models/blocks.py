"""Building blocks that compress itself puts into a user's model (not zoo models): a .cpz or a saved
file names them as data, so they live with the models, where ``coding.arch`` allows them."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualIdentity(nn.Module):
    """A residual block whose branch was removed: relu(shortcut(x) + offset).

    ``offset`` is a BatchNorm2d with zero scale, i.e. the per-channel constant the dead branch still
    added (its last BatchNorm's shift); as a BatchNorm it stays coupled to the stage's channels for
    later structural pruning.
    """

    def __init__(self, shortcut: nn.Module, offset: torch.Tensor):
        super().__init__()
        self.shortcut = shortcut
        self.offset = nn.BatchNorm2d(len(offset))
        with torch.no_grad():
            self.offset.weight.zero_()
            self.offset.bias.copy_(offset)

    def forward(self, x):
        s = self.shortcut(x)
        return F.relu(s + self.offset(s))
