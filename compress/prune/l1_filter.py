"""L1-norm filter pruning, Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017).

Each conv's filters (and each Linear's output features) are ranked by L1 norm and the smallest
are removed -- physically: the output is a smaller dense network. torch-pruning's DependencyGraph keeps every
coupled layer consistent
(BatchNorm, the next layer's inputs, residual additions, concatenations, depthwise convs); the
classifier's outputs are never pruned. ``sensitivity`` prunes each layer alone at several ratios
(Li et al.'s Figure 2) and ``ratios_for_budget`` turns that into per-layer ratios.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import torch
import torch.nn as nn

from compress.bounds import bounded
from compress.config import Config, FineTune, Select, Selection, check_keys, per_layer, register_method
from compress.counting import count_macs, count_params
from compress.distributed import device_of
from compress.errors import CompressError, InputError, first_line, safe
from compress.measure import latency_stats, speed_ratio
from compress.meta import read_meta
from compress.method import Context, Method
from compress.progress import Bar, progress_enabled
from compress.prune.graph import channel_groups, conv_groups, example_input, prune_group, refresh, unselected
from compress.prune.importance import IMPORTANCES, importance_for
from compress.scoring import evaluate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class L1FilterConfig(Config):
    """Args:
    ratio: filters to remove per coupled channel group: a float is a fraction, an int a count;
        a dict keyed by the group's root layer FQN ("layer1.0.conv1"), with "_default".
    min_channels: never leave a group with fewer channels than this.
    round_to: keep a multiple of this many channels in every pruned group (the nearest one,
        at least ``round_to``): GPU kernels (tensor cores) run fastest on multiples of 8. None:
        8 when the model is on a CUDA device, else 1 (on CPUs odd widths cost nothing measurable).
    target_macs: instead of ``ratio``, prune to this many MACs: a fraction of the input model's
        (0.5) or a count (2e6). Channels are ranked globally, across layers, by their L1 norm
        relative to their group's mean (Torch-Pruning's global pruning); one threshold for all.
    target_params: the same for parameters.
    importance: how channels are ranked, by name from ``prune.importance.IMPORTANCES``: "l1" (Li et al.,
        default), "l2", "bn-scale" (|gamma| of the following BatchNorm, Network Slimming), "group-lasso",
        "taylor" (the loss change to first order, Molchanov et al.; needs training data);
        ``register_importance`` adds one.
    target_latency: the same for the batch-1 latency measured on this machine, as a fraction of the
        input model's (0.6): each trial pruning is timed against the input, interleaved; the note gives
        the ratio reached.
    select: layers whose output channels may be removed (``Select``; ``exclude`` keeps a
        layer's channels). The classifier's outputs are never removed.
    finetune: fine-tuning after pruning (``FineTune``; 0 epochs: none).
    """

    verb = "prune"
    stage_name = "l1-filter"
    search_key = "ratio"

    ratio: float | int | dict = bounded(float, 0, 1, 0.5, hi_open=True, count=(0, 1_000_000), per_layer=True)
    min_channels: int = bounded(int, 1, 1_000_000, 1)
    round_to: int | None = bounded(int, 1, 1024, None)
    target_macs: float | None = bounded(float, 0, 1e18, None, lo_open=True)  # and see check_targets
    target_params: float | None = bounded(float, 0, 1e15, None, lo_open=True)
    target_latency: float | None = bounded(float, 0, 1, None, lo_open=True, hi_open=True)
    importance: str = dataclasses.field(default="l1", metadata={"choices": IMPORTANCES})
    select: Select = dataclasses.field(default_factory=Select)
    finetune: FineTune = dataclasses.field(default_factory=lambda: FineTune(augment=0))

    def __post_init__(self):
        check_targets(self)
        if not isinstance(self.importance, str) or self.importance not in IMPORTANCES:
            raise ValueError(f"importance {safe(self.importance)} unknown; known: {', '.join(sorted(IMPORTANCES))}")


def _count(ratio, size: int, min_channels: int, round_to: int = 1) -> int:
    n = ratio if isinstance(ratio, int) else int(round(ratio * size))
    n = max(0, min(n, size - min_channels))
    if round_to > 1 and n:
        keep = min(size, max(round_to, min_channels, int(round((size - n) / round_to)) * round_to))
        n = size - keep
    return n


def prune_filters(
    model: nn.Module,
    input_shape,
    ratio,
    min_channels: int = 1,
    select: Select | Selection | None = None,
    skipped: list | None = None,
    round_to: int = 1,
    importance: str = "l1",
) -> dict[str, tuple[int, int]]:
    """Remove the lowest-scoring filters (``importance``, default L1) of every group; returns {root: (before,
    after)} channels. Groups that cannot be pruned safely are left whole and listed in ``skipped`` (with why)."""
    dg, groups = channel_groups(
        model, input_shape, roots=(nn.Conv2d, nn.Linear), ignored=unselected(model, select or Select())
    )
    check_keys(ratio, [cg.name for cg in groups], "--ratio {key}: no prunable channel group of that name", types=())
    imp = importance_for(importance)
    changes = {}
    names = {m: n for n, m in model.named_modules()}

    def keep(cg, why: str) -> None:
        (skipped if skipped is not None else []).append(f"kept {cg.name}'s channels: {why}")
        log.info("kept %s: %s", cg.name, why)

    for cg in groups:
        r = per_layer(ratio, cg.name, None, 0.0)
        if _count(r, cg.size, min_channels, round_to) == 0:
            continue
        if cg.blocked is None:
            cg = refresh(dg, cg)  # scored on the model as it is now, after the groups before it
        g, why = conv_groups(cg, names) if cg.blocked is None else (1, cg.blocked)
        if why is not None:
            keep(cg, why)
            continue
        n = _count(r, cg.size, min_channels, math.lcm(round_to, g))  # grouped convs: keep whole rows of g
        if n == 0:
            continue
        scores = imp(cg.group, cg.size)
        if g > 1:  # the same positions in each of the g blocks (block scores summed), as torch-pruning does
            per = cg.size // g
            local = scores.view(g, per).sum(0).argsort()[: n // g]
            idxs = [int(i) + b * per for b in range(g) for i in local]
        else:
            idxs = scores.argsort()[:n].tolist()
        why = prune_group(dg, cg, idxs, model, input_shape)
        if why is not None:
            keep(cg, why)
            continue
        changes[cg.name] = (cg.size, cg.size - n)
        log.info("%s: %d -> %d channels", cg.name, cg.size, cg.size - n)
    return changes


def global_counts(
    model: nn.Module,
    input_shape,
    target: float,
    measure,
    min_channels: int = 1,
    select: Select | Selection | None = None,
    round_to: int = 1,
    steps: int = 24,
    importance: str = "l1",
) -> tuple[dict, float]:
    """Channels to remove per group so that ``measure(pruned) / measure(model)`` comes to ``target`` (a
    fraction): every prunable channel is scored by its L1 norm over the group's mean (so groups of any
    width and scale compare, as Torch-Pruning's global pruning with a mean normaliser), one threshold
    for all, found by bisection on trial prunings of copies. Returns ({group: count}, fraction reached)."""
    _, groups = channel_groups(
        model, input_shape, roots=(nn.Conv2d, nn.Linear), ignored=unselected(model, select or Select())
    )
    names = {m: n for n, m in model.named_modules()}
    imp = importance_for(importance)
    scored = []
    for cg in groups:
        if cg.blocked is not None or conv_groups(cg, names)[1] is not None:
            continue
        g = conv_groups(cg, names)[0]
        s = imp(cg.group, cg.size)
        scored.append((cg.name, cg.size, g, (s / s.mean().clamp_min(1e-12)).sort().values))
    base = measure(model)

    def counts(t: float) -> dict:
        out = {}
        for name, size, g, s in scored:
            n = _count(int((s < t).sum()), size, min_channels, math.lcm(round_to, g))
            if n:
                out[name] = n
        return out

    def reached(t: float) -> float:
        m = copy.deepcopy(model)
        prune_filters(m, input_shape, {**counts(t), "_default": 0}, min_channels, select, [], round_to, importance)
        return measure(m) / base

    lo, hi = 0.0, max((float(s[-1]) for *_, s in scored), default=0.0) * 1.0001
    best = (0.0, 1.0)  # (threshold, fraction): nothing removed
    for _ in range(steps):
        mid = (lo + hi) / 2
        r = reached(mid)
        if abs(r - target) < abs(best[1] - target):
            best = (mid, r)
        if abs(r - target) <= 0.005 * target:
            break
        lo, hi = (mid, hi) if r > target else (lo, mid)
    return counts(best[0]), best[1]


@register_method(L1FilterConfig)
class L1FilterPruner(Method):
    """Structural: ``attach`` removes the filters (the model gets smaller), then plain fine-tuning."""

    config: L1FilterConfig

    def attach(self) -> None:
        shape = self.ctx.shape(self.model)
        original = copy.deepcopy(self.model)
        imp = importance_for(self.config.importance)
        if hasattr(imp, "prepare"):  # a criterion that needs data (taylor) computes what it needs once
            imp.prepare(self.model, self.ctx)
        try:
            round_to = self.config.round_to
            if round_to is None:
                round_to = 8 if device_of(self.model).type == "cuda" else 1
            ratio = self.config.ratio
            target = self._target(shape)
            if target is not None:
                what, wanted, measure = target
                ratio, got = global_counts(
                    self.model,
                    shape,
                    wanted,
                    measure,
                    self.config.min_channels,
                    self.select,
                    round_to,
                    steps=10 if what == "latency" else 24,
                    importance=self.config.importance,
                )
                ratio["_default"] = 0
                self.records.append({"target": what, "wanted": round(wanted, 4), "reached": round(got, 4)})
                self.notes.append(target_note(what, wanted, got))
            changes = prune_filters(
                self.model,
                shape,
                ratio,
                self.config.min_channels,
                self.select,
                skipped=self.notes,
                round_to=round_to,
                importance=self.config.importance,
            )
            with torch.no_grad():
                self.model.eval()(example_input(self.model, shape))  # the pruned model must still run
        except CompressError:
            _restore(self.model, original)
            raise
        except Exception as e:
            # torch-pruning followed the channels into something it cannot shrink correctly (a reshape
            # it maps wrongly)
            _restore(self.model, original)
            msg = first_line(e, 120)
            raise InputError(
                f"l1-filter would break this model ({msg}); it was left unchanged. Keep the layers "
                "feeding a flatten or reshape (--exclude / select.exclude), or use threshold "
                "pruning"
            ) from e
        finally:
            if hasattr(imp, "release"):
                imp.release(self.model)
        self.layers = [{"name": k, "channels_before": b, "channels_after": a} for k, (b, a) in changes.items()]
        if not changes:
            self.notes.append("no channel group was pruned")

    def _target(self, shape):
        return resolve_target(self.config, self.model, shape)


def check_targets(config) -> None:
    """A config's ``target_macs`` / ``target_params`` (their declared ranges checked): a fraction in (0, 1) or a
    whole count >= 1; one target at most."""
    for k in ("target_macs", "target_params"):
        v = getattr(config, k)
        if v is not None and v >= 1 and v != int(v):
            raise ValueError(f"{k} must be a fraction in (0, 1) or a count >= 1, got {v!r}")
    if sum(getattr(config, k, None) is not None for k in ("target_macs", "target_params", "target_latency")) > 1:
        raise ValueError("give one of target_macs, target_params, target_latency (not both)")


def resolve_target(config, model: nn.Module, shape):
    """(what, fraction of the model's wanted, measure) for a config's target_macs / target_params, else None."""
    if getattr(config, "target_latency", None) is not None:
        return "latency", config.target_latency, LatencyFraction(model, shape)
    if config.target_macs is None and config.target_params is None:
        return None
    what, value, measure = (
        ("MACs", config.target_macs, lambda m: count_macs(m, shape))
        if config.target_macs is not None
        else ("parameters", config.target_params, count_params)
    )
    wanted = value if value < 1 else value / measure(model)
    if not wanted < 1:
        raise InputError(f"target {what} {value:,.0f} is not below the model's {measure(model):,}")
    return what, wanted, measure


class LatencyFraction:
    """A measure for ``global_counts``: a model's batch-1 latency as a fraction of the input model's, timed
    interleaved with it on this machine (``metrics.speed_ratio``: the median of the paired ratios); 1 for the
    input model itself, so that the bisection works on fractions."""

    def __init__(self, reference: nn.Module, shape):
        self.reference, self.shape = reference, shape

    def __call__(self, model: nn.Module) -> float:
        if model is self.reference:
            return 1.0
        raw: list = []
        was = model.training
        latency_stats([self.reference.eval(), model.eval()], self.shape, batch=1, runs=15, raw=raw)
        model.train(was)
        return 1 / speed_ratio(raw[0], raw[1])[1]  # reference time / model time is the speed-up


def target_note(what: str, wanted: float, got: float) -> str:
    miss = got / wanted - 1
    return f"target {what} {wanted:.3f} of the input model: reached {got:.3f} ({miss:+.1%})" + (
        ""
        if abs(miss) <= 0.05
        else "; the layers it may prune cannot go closer (min_channels, groups kept "
        "whole, --exclude): see the notes above"
    )


def _restore(model: nn.Module, original: nn.Module) -> None:
    """Put ``original``'s whole state back into ``model`` in place (the caller holds ``model``)."""
    model.__dict__.clear()
    model.__dict__.update(original.__dict__)


def sensitivity(model: nn.Module, val_data, ratios=(0.1, 0.3, 0.5, 0.7, 0.9), input_shape=None, metric=None) -> dict:
    """Prune each group alone at each ratio (no fine-tuning); the score (``metric``, default top-1
    accuracy) per group and ratio."""
    ctx = Context(val=val_data, input_shape=input_shape, metric=metric)
    shape, val_data = ctx.shape(model), ctx.val
    base = evaluate(model, val_data, metric)
    _, groups = channel_groups(model, shape, roots=(nn.Conv2d, nn.Linear))
    groups = [cg for cg in groups if cg.blocked is None]
    table = {}
    bar = Bar(progress_enabled(), len(groups) * len(ratios), "sensitivity")
    try:
        for cg in groups:
            row = {}
            for r in ratios:
                m = copy.deepcopy(model)
                prune_filters(m, shape, {cg.name: float(r), "_default": 0.0})
                row[float(r)] = round(evaluate(m, val_data, metric), 3)
                bar.update(f"{cg.name} at {r:.0%}")
            table[cg.name] = {"channels": cg.size, "accuracy": row}
    finally:
        bar.close()
    return {
        "baseline": round(base, 3),
        "ratios": [float(r) for r in ratios],
        "layers": table,
        "arch": read_meta(model).arch,
    }


def ratios_for_budget(sens: dict, max_drop: float) -> dict[str, float]:
    """Per group, the largest ratio whose accuracy drop (pruned alone) stays within ``max_drop``."""
    out = {}
    for name, row in sens["layers"].items():
        ok = [r for r, acc in row["accuracy"].items() if sens["baseline"] - acc <= max_drop]
        out[name] = max(ok) if ok else 0.0
    out["_default"] = 0.0
    return out
