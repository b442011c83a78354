"""Threshold (magnitude) pruning, Han et al., "Learning both Weights and Connections for
Efficient Neural Networks" (NeurIPS 2015).

Each layer's threshold is ``quality x std(layer weights)``. Given a target sparsity instead of a
quality, one global quality is solved for by bisection so that the whole model reaches the target:
layers with widely spread weights keep more. A conv stem and the last layer are pruned less (their
threshold is scaled by ``first_last_factor``, see ``Select.spare_first_last``); the first Linear of an
MLP is not spared -- it holds most of the weights, and sparing it would cut every other layer to the
bone. Pruning is iterative: ``rounds`` rounds, each raising sparsity (geometrically in the kept
fraction) and followed by its share of the fine-tuning epochs with masks held.

``ThresholdPruner`` is the whole method; in your own loop give it ``steps_per_round`` and it moves
to the next round by itself (see ``compress.ThresholdPruner``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn

from compress import masks
from compress.config import (
    Config,
    FineTune,
    Select,
    Selection,
    bounded,
    check_keys,
    per_layer,
    register_method,
    uncovered,
)
from compress.method import Context, KeepMasks
from compress.prune import allocate as alloc

log = logging.getLogger(__name__)
ALLOCATE = ("sensitivity", "std")
SCHEDULES = ("cubic", "geometric")


@dataclasses.dataclass(frozen=True)
class ThresholdConfig(Config):
    """Args:
    sparsity: target fraction of zero weights. A float is global (one quality x std rule over the
        model); a dict gives per-layer targets keyed by FQN or by layer type ("conv", "linear"),
        with "_default" for the rest.
    quality: instead of a sparsity, the threshold multiplier of each layer's std (float or dict).
    allocate: how a float ``sparsity`` is shared among layers: "sensitivity" (each layer pruned
        alone on training data; every layer pruned to the same loss rise per weight removed, see
        ``prune.allocate``) or "std" (Han et al.'s one ``quality x std`` rule). Without training
        data: "std".
    rounds: pruning rounds; the fine-tuning epochs are split evenly over them.
    schedule: how sparsity rises over the rounds, from where the model is to the target:
        "cubic" (Zhu & Gupta 2017: fast first, gently at the end) or "geometric" (the kept
        fraction shrinks by the same factor each round).
    first_last_factor: with ``select.spare_first_last``, a conv stem's and the last layer's
        thresholds are scaled by this (< 1 prunes them less).
    select: which layers are pruned (``Select``).
    finetune: fine-tuning with masks held (``FineTune``; ``epochs`` is the total over all rounds).
    """

    verb = "prune"
    stage_name = "threshold"
    search_key = "sparsity"
    iterative = True

    sparsity: float | dict | None = bounded(float, 0, 1, None, hi_open=True, per_layer=True)
    quality: float | dict | None = bounded(float, 0, 100, None, per_layer=True)
    allocate: str = dataclasses.field(default="sensitivity", metadata={"choices": ALLOCATE})
    rounds: int = bounded(int, 1, 1000, 3)
    schedule: str = dataclasses.field(default="cubic", metadata={"choices": SCHEDULES})
    first_last_factor: float = bounded(float, 0, 1, 0.5, lo_open=True)
    select: Select = dataclasses.field(default_factory=Select)
    finetune: FineTune = dataclasses.field(default_factory=lambda: FineTune(epochs=3.0, lr=1e-3))

    def __post_init__(self):
        if (self.sparsity is None) == (self.quality is None):
            raise ValueError("give exactly one of sparsity or quality")
        if self.allocate not in ALLOCATE:
            raise ValueError(f"allocate must be one of {', '.join(ALLOCATE)}, got {self.allocate!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def _kth_abs(w: torch.Tensor, fraction: float) -> float:
    """Magnitude below which ``fraction`` of w lies."""
    k = int(round(fraction * w.numel()))
    if k <= 0:
        return 0.0
    return float(w.abs().flatten().kthvalue(min(k, w.numel())).values)


def thresholds(
    model: nn.Module, config: ThresholdConfig, sparsity=None, data=None, loss=None, select: Selection | None = None
) -> dict[str, float]:
    """Per-layer magnitude thresholds for a (possibly intermediate) sparsity target; ``data``
    (a ``compress.data.Data``) lets a float target be shared among layers by sensitivity (the rise of
    ``loss``, default cross-entropy). ``select``: the layers pruned (default: the config's ``select``)."""
    select = select or Selection(config.select)
    layers = select.layers(model)
    for value in (config.sparsity, config.quality):
        check_keys(value, [n for n, _ in layers], "no prunable layer {key!r}")
    if not layers:
        return {}
    ends = select.ends(model)
    factor = {n: config.first_last_factor if n in ends else 1.0 for n, _ in layers}
    std = {n: float(m.weight.detach().std()) or 1e-12 for n, m in layers}
    target = config.sparsity if sparsity is None else sparsity
    if config.quality is not None:
        return {n: per_layer(config.quality, n, m, 0.0) * factor[n] * std[n] for n, m in layers}
    if isinstance(target, dict):
        return {n: _kth_abs(m.weight.detach(), per_layer(target, n, m, 0.0)) for n, m in layers}
    if config.allocate == "sensitivity" and data is not None:
        per = alloc.allocate(
            alloc.loss_curves(model, layers, data, loss=loss),
            {n: m.weight.numel() for n, m in layers},
            float(target or 0.0),
        )
        return {n: _kth_abs(m.weight.detach(), per[n]) for n, m in layers}
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


def round_targets(config: ThresholdConfig, start: float = 0.0) -> list:
    """Sparsity after each round k of K, from ``start`` (the model's sparsity now) to the target s:
    cubic, s + (start - s)(1 - k/K)^3, or geometric in the kept fraction,
    1 - (1 - start)((1 - s) / (1 - start))^(k/K). A per-layer dict target rises from 0."""
    s, steps = config.sparsity, config.rounds

    def at(k, target, s0):
        s0 = min(s0, target)
        if config.schedule == "cubic":
            return target + (s0 - target) * (1 - k / steps) ** 3
        return 1 - (1 - s0) * ((1 - target) / (1 - s0)) ** (k / steps)

    if s is None:
        return [None] * steps
    if isinstance(s, dict):
        return [{key: at(k, v, 0.0) for key, v in s.items()} for k in range(1, steps + 1)]
    return [at(k, s, start) for k in range(1, steps + 1)]


def apply_thresholds(model: nn.Module, th: dict[str, float]) -> None:
    mods = dict(model.named_modules())
    for n, t in th.items():
        m = mods[n]
        keep = (m.weight.detach().abs() > t).to(m.weight.dtype)
        old = masks.get_mask(m)
        masks.set_mask(m, keep if old is None else keep * old)


def sparsity_of(model: nn.Module, select: Select | Selection | None = None) -> float:
    layers = (select or Select()).layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return zeros / max(total, 1)


@register_method(ThresholdConfig)
class ThresholdPruner(KeepMasks):
    """Iterative threshold pruning. Round 1 prunes at ``attach``; with ``steps_per_round`` (your
    own loop) round k+1 prunes after k x steps_per_round calls of ``step``; the library calls
    ``next_round`` between its fine-tuning runs instead."""

    config: ThresholdConfig

    def __init__(
        self, model: nn.Module, config: ThresholdConfig, ctx: Context | None = None, steps_per_round: int | None = None
    ):
        super().__init__(model, config, ctx)
        if steps_per_round is not None and steps_per_round < 1:
            raise ValueError("steps_per_round must be >= 1")
        self.steps_per_round = steps_per_round
        self.targets: list = []
        self.round = self.steps = 0

    def attach(self) -> None:
        self.targets = round_targets(self.config, sparsity_of(self.model, self.select))
        left = uncovered(self.model, self.select.layers(self.model))
        if left:
            self.notes.append(f"not pruned: {left}")
        self.next_round()

    def next_round(self) -> None:
        if self.round < len(self.targets):
            target = self.targets[self.round]
            apply_thresholds(
                self.model, thresholds(self.model, self.config, target, self.ctx.train, self.ctx.loss, self.select)
            )
            self.round += 1
            log.info("round %d/%d: sparsity %.4f", self.round, self.config.rounds, sparsity_of(self.model, self.select))

    def step(self, lr: float | None = None) -> bool:
        super().step(lr)  # masks hold
        self.steps += 1
        if self.steps_per_round and self.steps % self.steps_per_round == 0:
            self.next_round()
        return False

    def fine_tune(self) -> None:
        epochs = self.config.finetune.epochs / self.config.rounds
        for k in range(1, self.config.rounds + 1):
            if self.ctx.train is not None and epochs > 0:
                self.train(epochs, seed=k, desc=f"threshold round {k}/{self.config.rounds}")
            rec = {"round": k, "sparsity": round(sparsity_of(self.model, self.select), 4)}
            if self.ctx.val is not None:
                rec["accuracy"] = round(self.ctx.score(self.model, self.ctx.val), 3)
            self.records.append(rec)
            self.ctx.emit("round", of=self.config.rounds, **rec)
            if k < self.config.rounds:
                self.next_round()

    def finalize(self) -> nn.Module:
        super().finalize()
        mods = dict(self.model.named_modules())
        for n, _ in self.select.layers(self.model):
            w = mods[n].weight
            self.layers.append({"name": n, "params": w.numel(), "nonzeros": int(torch.count_nonzero(w))})
        return self.model
