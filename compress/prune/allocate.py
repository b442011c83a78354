"""Per-layer sparsity from a sensitivity analysis: which layers can lose the most weights.

One global magnitude rule (``quality x std`` over the whole model) over-prunes the small layers
that matter most -- on LeNet-5 at 97 % overall it left 56 of conv1's 500 weights and the model
fell to 93.6 %; on LeNet-300-100 at 98 % it left 87 of the classifier's 1,000 (63 %). Here every
layer is pruned alone, by magnitude, at a grid of sparsities, and the rise in training loss is
measured (no fine-tuning: a cheap forward pass per point, as in Han et al.'s and Li et al.'s
sensitivity analyses). The weights to remove are then shared out at the least total loss rise
(``allocate``): every layer is pruned to the same marginal cost in loss per weight removed, so
the big, redundant layers give up the most. Iterative pruning re-measures the curves at every
round, on the model as it is then.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.config import Layer
from compress.data import batches
from compress.distributed import device_of
from compress.scoring import to_device

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998)
SAMPLES = 256


def _loss(model: nn.Module, x: torch.Tensor, y, loss=None) -> float:
    return float((loss or F.cross_entropy)(model(x), y))


@torch.no_grad()
def loss_curves(
    model: nn.Module, layers: list[tuple[str, Layer]], data, samples: int = SAMPLES, loss=None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer: (sparsities, loss rise) when that layer alone is magnitude-pruned to each sparsity
    (on top of the zeros it has). The rise is made non-decreasing (a running maximum)."""
    dev = device_of(model)
    order = None if data.iterable else torch.arange(min(samples, len(data)))
    x, y = next(iter(batches(data, samples, order)))
    x, y = x.to(dev), to_device(y, dev)
    was_training = model.training
    model.eval()
    try:
        base = _loss(model, x, y, loss)
        out = {}
        for name, m in layers:
            w = m.weight
            orig = w.detach().clone()
            mag = orig.abs().flatten()
            now = float((mag == 0).float().mean())
            order = mag.sort().values
            ss, ds = [now], [0.0]
            for s in GRID:
                if s <= now:
                    continue
                k = min(int(round(s * mag.numel())), mag.numel())
                w.mul_((orig.abs() > order[k - 1]).to(w.dtype))
                ss.append(s)
                ds.append(max(_loss(model, x, y, loss) - base, ds[-1]))
                w.copy_(orig)
            out[name] = (np.array(ss), np.array(ds))
        return out
    finally:
        model.train(was_training)


def _hull(n: int, curve: tuple[np.ndarray, np.ndarray]) -> list[tuple[float, float]]:
    """Lower convex hull of (weights removed, loss rise), as (removed, rise) vertices."""
    pts = [(float(s) * n, float(d)) for s, d in zip(*curve, strict=False)]
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], sizes: dict[str, int], target: float
) -> dict[str, float]:
    """Per-layer sparsities that remove ``target`` of all weights at the least total loss rise.

    The rises are taken as additive; on each layer's convex hull the cheapest weights (least
    rise per weight removed) are taken first, over all layers at once, until enough are removed
    -- every layer ends at the same marginal cost, so a big layer gives up many weights for the
    same harm as a small layer gives up few."""
    segments, removed = [], {}
    for name, curve in curves.items():
        hull = _hull(sizes[name], curve)
        removed[name] = hull[0][0]
        for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
            segments.append(((y2 - y1) / (x2 - x1), name, x2 - x1))
    need = target * sum(sizes.values()) - sum(removed.values())
    for _, name, width in sorted(segments, key=lambda t: t[0]):  # a layer's slopes rise: its order holds
        if need <= 0:
            break
        take = min(width, need)
        removed[name] += take
        need -= take
    return {n: min(removed[n] / sizes[n], GRID[-1]) for n in curves}
