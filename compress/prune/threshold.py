"""Threshold (magnitude) pruning, Han et al., "Learning both Weights and Connections for
Efficient Neural Networks" (NeurIPS 2015).

Each layer's threshold is ``quality x std(layer weights)``. Given a target sparsity instead of a
quality, one global quality is solved for by bisection so that the whole model reaches the target:
layers with widely spread weights keep more. A conv stem and the last layer are pruned less (their
threshold is scaled by ``first_last_factor``); the first Linear of an MLP is not spared -- it holds
most of the weights, and sparing it would cut every other layer to the bone. Pruning is iterative: ``steps`` rounds, each
raising sparsity (geometrically in the kept fraction) and followed by fine-tuning with masks held.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
import torch.nn as nn

from .. import masks
from ..config import Config, per_layer, register_handler
from ..train import TrainConfig, fit

log = logging.getLogger(__name__)


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


@dataclasses.dataclass(frozen=True)
class ThresholdConfig(Config):
    """Args:
        sparsity: target fraction of zero weights. A float is global (one quality x std rule over the
            model); a dict gives per-layer targets keyed by FQN or by layer type ("conv", "linear"),
            with "_default" for the rest.
        quality: instead of a sparsity, the threshold multiplier of each layer's std (float or dict).
        steps: pruning rounds; each is followed by ``epochs`` of fine-tuning with masks held.
        epochs: fine-tuning epochs after each round (0: prune only).
        lr: fine-tuning learning rate (Adam).
        first_last_factor: a conv stem's and the last layer's thresholds are scaled by this
            (< 1 prunes them less: they are the most sensitive layers).
        filter_fn: ``(module, fqn) -> bool`` choosing layers (default: every Conv2d and Linear).
        augment: random-shift augmentation (pixels) during fine-tuning, as the model was trained.
    """

    sparsity: float | dict | None = None
    quality: float | dict | None = None
    steps: int = 3
    epochs: float = 1.0
    lr: float = 1e-3
    first_last_factor: float = 0.5
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    augment: int = 0

    def __post_init__(self):
        if (self.sparsity is None) == (self.quality is None):
            raise ValueError("give exactly one of sparsity or quality")
        for v in _values(self.sparsity):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {v}")
        for v in _values(self.quality):
            if v < 0:
                raise ValueError(f"quality must be >= 0, got {v}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if not 0 < self.first_last_factor <= 1:
            raise ValueError("first_last_factor must be in (0, 1]")


def _values(v):
    if v is None:
        return []
    return list(v.values()) if isinstance(v, dict) else [v]


def _layers(model: nn.Module, filter_fn) -> list[tuple[str, nn.Module]]:
    f = filter_fn or _default_filter
    return [(n, m) for n, m in model.named_modules() if getattr(m, "weight", None) is not None and f(m, n)]


def _type_key(m: nn.Module) -> str:
    return "conv" if isinstance(m, nn.Conv2d) else "linear" if isinstance(m, nn.Linear) else type(m).__name__


def _kth_abs(w: torch.Tensor, fraction: float) -> float:
    """Magnitude below which ``fraction`` of w lies."""
    k = int(round(fraction * w.numel()))
    if k <= 0:
        return 0.0
    return float(w.abs().flatten().kthvalue(min(k, w.numel())).values)


def thresholds(model: nn.Module, config: ThresholdConfig, sparsity=None) -> dict[str, float]:
    """Per-layer magnitude thresholds for a (possibly intermediate) sparsity target."""
    layers = _layers(model, config.filter_fn)
    if not layers:
        return {}
    factor = {n: 1.0 for n, _ in layers}
    if isinstance(layers[0][1], nn.Conv2d):
        factor[layers[0][0]] *= config.first_last_factor
    factor[layers[-1][0]] *= config.first_last_factor
    std = {n: float(m.weight.detach().std()) or 1e-12 for n, m in layers}
    target = config.sparsity if sparsity is None else sparsity
    if config.quality is not None:
        return {n: per_layer(config.quality, n, per_layer(config.quality, _type_key(m), 0.0)) * factor[n] * std[n]
                for n, m in layers}
    if isinstance(target, dict):
        return {n: _kth_abs(m.weight.detach(), per_layer(target, n, per_layer(target, _type_key(m), 0.0)))
                for n, m in layers}
    # one global quality: bisection on q so that the pruned fraction over all layers = target
    ws = {n: m.weight.detach().abs().flatten() for n, m in layers}
    total = sum(w.numel() for w in ws.values())

    def pruned(q):
        return sum(int((w <= q * factor[n] * std[n]).sum()) for n, w in ws.items()) / total

    lo, hi = 0.0, 1.0
    while pruned(hi) < target and hi < 1e6:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pruned(mid) < target else (lo, mid)
    return {n: hi * factor[n] * std[n] for n in ws}


def _step_targets(config: ThresholdConfig):
    """Geometric schedule in the kept fraction: 1 - (1 - s)^(k / steps)."""
    s = config.sparsity
    for k in range(1, config.steps + 1):
        if s is None:
            yield None
        elif isinstance(s, dict):
            yield {key: 1 - (1 - v) ** (k / config.steps) for key, v in s.items()}
        else:
            yield 1 - (1 - s) ** (k / config.steps)


def apply_thresholds(model: nn.Module, th: dict[str, float]) -> None:
    mods = dict(model.named_modules())
    for n, t in th.items():
        m = mods[n]
        keep = (m.weight.detach().abs() > t).to(m.weight.dtype)
        old = masks.get_mask(m)
        masks.set_mask(m, keep if old is None else keep * old)


def sparsity_of(model: nn.Module, filter_fn=None) -> float:
    layers = _layers(model, filter_fn)
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / max(total, 1)


@register_handler(ThresholdConfig)
def _threshold(model: nn.Module, config: ThresholdConfig, train_data=None, val_data=None,
               train_config: TrainConfig | None = None, on_round=None) -> nn.Module:
    for k, target in enumerate(_step_targets(config), 1):
        th = thresholds(model, config, target)
        apply_thresholds(model, th)
        log.info("round %d/%d: sparsity %.4f", k, config.steps, sparsity_of(model, config.filter_fn))
        if train_data is not None and config.epochs > 0:
            tc = train_config or TrainConfig(epochs=config.epochs, lr=config.lr, seed=k, augment=config.augment)
            fit(model, train_data, tc, desc=f"threshold round {k}/{config.steps}")
        if on_round is not None:
            on_round(model, k)
    masks.remove_masks(model)
    return model


def threshold(model: nn.Module, sparsity=None, *, quality=None, train_data=None, val_data=None, **kw) -> nn.Module:
    """Threshold-prune ``model`` in place and return it: ``threshold(model, 0.9, train_data=d)``."""
    return _threshold(model, ThresholdConfig(sparsity=sparsity, quality=quality, **kw), train_data, val_data)
