"""How a model is scored: a ``Metric`` (top-1 by default, top-5, or the user's ``metric(outputs, targets)``, per
sample or per batch), the ``Scores`` of a model on data, the paired drop between two models' scores on the
same samples, and the ``Judge`` that tests a model against an accuracy budget. Every accuracy compress shows
comes from here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress import distributed
from compress.data import as_data, batches, eval_batch_size
from compress.errors import CompressError, InputError, first_line
from compress.user_code import resolve_callable


def to_device(v, dev):
    """Tensors (also inside tuples, lists and dicts of targets) on ``dev``."""
    if isinstance(v, torch.Tensor):
        return v.to(dev, non_blocking=True)
    if isinstance(v, (tuple, list)):
        return type(v)(to_device(t, dev) for t in v)
    if isinstance(v, dict):
        return {k: to_device(t, dev) for k, t in v.items()}
    return v


def _top1(outputs, targets):
    return (outputs.argmax(1) == targets).float() * 100.0


def _top5(outputs, targets):
    k = min(5, outputs.shape[1])
    return (outputs.topk(k, 1).indices == targets[:, None]).any(1).float() * 100.0


@dataclass(frozen=True)
class Metric:
    """How a model is scored: ``fn(outputs, targets)`` -> a vector of per-sample scores or one number for
    the batch (averaged over batches by size). Higher is better; budgets are in its units ("points")."""

    name: str
    fn: Callable[[Any, Any], Any]
    unit: str = ""

    @property
    def label(self) -> str:
        return {"top1": "accuracy %", "top5": "top-5 accuracy %"}.get(self.name, f"{self.name} {self.unit}".strip())

    @property
    def builtin(self) -> bool:
        return self.name in METRICS


METRICS = {"top1": Metric("top1", _top1, "%"), "top5": Metric("top5", _top5, "%")}


def resolve_metric(metric=None) -> Metric:
    """None or "top1", "top5", a ``Metric``, a callable, or ``module:fn`` / ``file.py:fn`` -> a Metric."""
    if metric is None:
        return METRICS["top1"]
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric in METRICS:
            return METRICS[metric]
        return Metric(metric, resolve_callable(metric, what="--metric"))
    if callable(metric):
        return Metric(getattr(metric, "__name__", "metric"), metric)
    raise ValueError(f"metric must be 'top1', 'top5', a callable or module:fn, got {metric!r}")


@dataclass
class Scores:
    """A model's scores on a data set: per sample (``weights`` None) or per batch (``weights``: batch sizes)."""

    values: torch.Tensor
    weights: torch.Tensor | None = None

    def mean(self) -> float:
        if self.weights is None:
            return float(self.values.double().mean())
        return float((self.values.double() * self.weights).sum() / self.weights.sum())


def paired_drop(base: Scores, cand: Scores) -> tuple[float, float]:
    """The score drop of a candidate vs the base on the same samples (in the metric's units) and its
    standard error from the paired differences. For a 0/100 metric (top-1) this is McNemar's: only
    the samples the two disagree on count. For a per-batch metric the batches are the units (a ratio
    estimator weighted by batch size)."""
    d = base.values.double() - cand.values.double()
    if base.weights is None:
        n = len(d)
        drop = float(d.mean())
        return drop, float(d.var(unbiased=False).sqrt()) / math.sqrt(n) if n else 0.0
    w = base.weights.double()
    drop = float((w * d).sum() / w.sum())
    return drop, float(((w * (d - drop)) ** 2).sum().sqrt() / w.sum())


def errors_allowed(n: int, budget: float, z: float) -> int:
    """The most samples a candidate may get wrong that the input gets right, none the other way, and still be
    within ``budget`` points at ``z`` standard errors on ``n`` samples of a 0/100 metric (McNemar's, as
    ``paired_drop``): the finest change the budget can tell from noise. 0: no change that costs a sample passes."""
    k = 0
    while k < n:
        b = k + 1
        if 100.0 * b / n + z * 100.0 * math.sqrt(max(b - b * b / n, 0.0)) / n > budget + 1e-9:
            break
        k = b
    return k


def samples_for(errors: int, budget: float, z: float, limit: int = 10**7) -> int | None:
    """The fewest samples on which the budget allows ``errors`` (``errors_allowed``); None past ``limit``."""
    lo, hi = 1, 1
    while errors_allowed(hi, budget, z) < errors:
        if hi >= limit:
            return None
        lo, hi = hi, min(hi * 2, limit)
    while lo < hi:  # errors_allowed grows with n (the SE and each sample's weight shrink)
        mid = (lo + hi) // 2
        if errors_allowed(mid, budget, z) >= errors:
            hi = mid
        else:
            lo = mid + 1
    return hi


@torch.no_grad()
def scores(model: nn.Module, data, metric=None, batch_size: int | None = None) -> Scores:
    """Score ``model`` on every sample of ``data`` (anything ``compress.data.as_data`` takes) with ``metric``
    (default top-1), in batches."""
    data = as_data(data, arg="data")
    m = resolve_metric(metric)
    was = model.training
    model.eval()
    dev = distributed.device_of(model)
    vals, weights, per_sample = [], [], None
    try:
        for x, y in batches(data, batch_size or eval_batch_size(data)):
            out = model(x.to(dev))
            y = to_device(y, dev)
            try:
                v = m.fn(out, y)
            except CompressError:
                raise
            except Exception as e:
                raise InputError(
                    f"metric {m.name} failed on a batch of {data.name}: {type(e).__name__}: {first_line(e)}"
                ) from e
            v = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
            ps = v.dim() == 1 and len(v) == len(x)
            if not ps and v.numel() != 1:
                raise InputError(
                    f"metric {m.name} returned shape {tuple(v.shape)}; a vector of {len(x)} per-sample "
                    "scores or one number per batch expected"
                )
            if per_sample is not None and ps != per_sample:
                raise InputError(
                    f"metric {m.name} returned per-sample scores for some batches and one number for others"
                )
            per_sample = ps
            vals.append(v if ps else v.reshape(1))
            weights.append(len(x))
    finally:
        model.train(was)
    if not vals:
        raise InputError(f"data {data.name}: no samples")
    values = torch.cat(vals)
    if not torch.isfinite(values).all():
        raise InputError(f"metric {m.name} gave NaN or infinite scores on {data.name}")
    return Scores(values, None if per_sample else torch.tensor(weights, dtype=torch.float64))


def evaluate(model: nn.Module, data, metric=None, batch_size: int | None = None) -> float:
    """The model's score on ``data``: top-1 accuracy in percent by default, else ``metric``'s mean. ``data``:
    ``(x, y)`` tensors, a ``Dataset``, a ``DataLoader`` or a ``compress.data.Data`` (``compress.data.as_data``)."""
    return scores(model, data, metric, batch_size).mean()


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The model's outputs for inputs ``x`` (in eval mode, in batches), on the CPU."""
    was = model.training
    model.eval()
    dev = distributed.device_of(model)
    out = torch.cat([model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


@dataclass
class Judge:
    """The budget test of a model against a reference model (the pipeline's rule, ``compress.search``): on
    ``data``, a model is *within budget* when its score drop against the reference plus ``z`` standard errors of
    that paired drop is at most ``budget`` points; *over* when the measured drop alone is over. ``evaluate``: the
    user's ``evaluate(model, data) -> float`` instead of ``metric`` (one number: no standard error). ``start``
    scores the reference once; each call scores a candidate."""

    data: Any
    budget: float
    z: float = 1.0
    metric: Any = None
    evaluate: Callable | None = None
    ref: Any = None

    def _scores(self, model: nn.Module) -> Scores | float:
        if self.evaluate is not None:  # the user's one number: no paired differences, no standard error
            return float(self.evaluate(model, as_data(self.data, arg="data")))
        return scores(model, self.data, self.metric)

    def start(self, model: nn.Module) -> float:
        """Score the reference; returns its score."""
        self.ref = self._scores(model)
        return self.ref if isinstance(self.ref, float) else self.ref.mean()

    def __call__(self, model: nn.Module) -> dict:
        """``accuracy``, ``drop``, ``se``, ``within_budget``, ``over``, ``verdict`` (in words) and ``why`` (the
        sum, in words) of ``model`` against the reference (``start`` first)."""
        if self.ref is None:
            raise RuntimeError("Judge.start(reference) before judging a model")
        cand = self._scores(model)
        if isinstance(cand, float) or isinstance(self.ref, float):
            acc = cand if isinstance(cand, float) else cand.mean()
            ref = self.ref if isinstance(self.ref, float) else self.ref.mean()
            drop, se = ref - acc, 0.0
        else:
            acc = cand.mean()
            drop, se = paired_drop(self.ref, cand)
        margin = drop + self.z * se
        ok = margin <= self.budget
        over = drop > self.budget  # the measured drop alone is over: evidence, not noise
        why = (
            f"drop {drop:+.2f} + {self.z:g} x SE {se:.2f} = {margin:.2f} pt "
            f"{'<=' if ok else '>'} budget {self.budget:g} pt"
        )
        word = "within budget: " if ok else "over budget: " if over else "inconclusive (over by its margin only): "
        return {
            "accuracy": round(acc, 3),
            "drop": round(drop, 3),
            "se": round(se, 3),
            "within_budget": ok,
            "over": over,
            "verdict": word + why,
            "why": why,
        }
