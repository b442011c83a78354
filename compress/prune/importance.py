"""Channel importance scores, as callables on a channel group (torch-pruning's Importance API), and the
registry l1-filter picks one from by name (``L1FilterConfig(importance="bn-scale")``, ``--importance``).

A new criterion is one small class with ``__call__(group, size) -> (size,) scores`` (lower is removed first),
decorated ``@register_importance("name")``; no new config, flag or method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.prune.graph import group_norms, slices

IMPORTANCES: dict[str, Callable[[], object]] = {}


def register_importance(name: str):
    """Make an importance class available by ``name`` to l1-filter (and its targets)."""

    def deco(cls):
        IMPORTANCES[name] = cls
        return cls

    return deco


def importance_for(name: str):
    """An instance of the importance registered as ``name``."""
    try:
        return IMPORTANCES[name]()
    except KeyError:
        raise ValueError(f"importance {name!r} unknown; known: {', '.join(sorted(IMPORTANCES))}") from None


def _summed(group, size: int, kinds, per_row) -> torch.Tensor:
    score = torch.zeros(size)
    with torch.no_grad():
        for kind, ridx, w in slices(group):
            if kind in kinds:
                score.index_add_(0, ridx, per_row(w).float().cpu())
    return score


@register_importance("l1")
class L1FilterImportance:
    """Li et al. 2017: the L1 norm of each output filter, summed over every layer that produces
    the coupled channels (in a residual stage, every conv writing into it)."""

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        return _summed(group, size or len(group[0].idxs), ("out", "out_bn"), lambda w: w.abs().sum(1))


@register_importance("l2")
class L2FilterImportance:
    """The L2 norm of each output filter (summed over the layers producing the coupled channels)."""

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        return _summed(group, size or len(group[0].idxs), ("out", "out_bn"), lambda w: w.pow(2).sum(1).sqrt())


@register_importance("bn-scale")
class BNScaleImportance:
    """Network Slimming (Liu et al. 2017): |gamma| of the BatchNorm after each channel (summed over the coupled
    BatchNorms); channels without one score by their filters' L1 norm instead."""

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        size = size or len(group[0].idxs)
        score = _summed(group, size, ("bn",), lambda w: w[:, 0].abs())
        return score if bool(score.any()) else L1FilterImportance()(group, size)


@register_importance("group-lasso")
class GroupLassoImportance:
    """The L2 norm of each channel over all coupled slices (PruneTrain's group-lasso groups)."""

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        size = size or len(group[0].idxs)
        with torch.no_grad():
            return group_norms(group, size).sqrt().float().cpu()
