"""Channel importance scores, as callables on a channel group (torch-pruning's Importance API)."""
from __future__ import annotations

import torch

from .graph import slices


class L1FilterImportance:
    """Li et al. 2017: the L1 norm of each output filter, summed over every layer that produces
    the coupled channels (in a residual stage, every conv writing into it)."""

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        size = size or len(group[0].idxs)
        score = torch.zeros(size)
        with torch.no_grad():
            for kind, ridx, w in slices(group):
                if kind in ("out", "out_bn"):
                    score.index_add_(0, ridx, w.abs().sum(1).float().cpu())
        return score


class GroupLassoImportance:
    """The L2 norm of each channel over all coupled slices (PruneTrain's group-lasso groups)."""

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        from .graph import group_norms

        size = size or len(group[0].idxs)
        with torch.no_grad():
            return group_norms(group, size).sqrt().float().cpu()
