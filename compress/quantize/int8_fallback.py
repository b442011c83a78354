"""Mixed precision under an accuracy budget: the INT8 layers that cost the most are kept float, one at a time,
until the model's accuracy drop is within the budget (as Intel Neural Compressor's tuning falls back op by op).

The int8 stage (``int8_stage.py``) calls ``fall_back`` after PTQ when a budget is given and the all-INT8 model
misses it. The layers are ranked once, by what each costs: the output error (relative L2 against FP32) of the
model with only that layer kept float, measured as the auto observer judges its candidates -- calibrated on the
first three quarters of the calibration samples, measured on the last quarter. The most costly layer is the one
whose float copy leaves the least error; a layer whose float copy does not lower the error is never kept float.
Then the most costly layers are kept float one by one, the model made again (calibrated on every calibration
sample) and judged on the validation data, until it is within budget or ``limit`` layers are float.

What it costs, for L quantized Conv/Linear layers and k layers kept float: L + k calibrations and conversions
(one more when the all-INT8 model's error on the held-out samples is not known from the auto observer's search)
and k evaluations on the validation data. Each calibration runs the calibration samples once through the
prepared model; nothing is compiled (the candidates run as their reference graphs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch.nn as nn

Build = Callable[[tuple[str, ...], bool], nn.Module]  # (layers kept float, ranking?) -> a converted model


@dataclasses.dataclass
class Fallback:
    """What the fallback did. ``kept``: the layers it kept float, the most costly first; ``model``, ``verdict``:
    the converted model kept (the first within budget, else the one with the least drop) and its judge's verdict;
    ``rows``: one per layer of ``kept``, ``[layer, output error all INT8, output error with only it float, score
    before it was float, score after]``; ``ranked``: the layers it ranked; ``tried``: the layers it made float
    (``kept`` and any tried past it); ``conversions``: the models it calibrated and converted."""

    kept: tuple[str, ...]
    model: nn.Module
    verdict: dict
    rows: list[list] = dataclasses.field(default_factory=list)
    ranked: int = 0
    tried: int = 0
    conversions: int = 0

    @property
    def met(self) -> bool:
        return bool(self.verdict["within_budget"])


def rank(layers: Sequence[str], build: Build, error: Callable[[nn.Module], float]) -> list[tuple[str, float]]:
    """``(layer, output error of the model with only it float)``, the most costly layer (the least error once
    float) first; layers of equal error in the order given."""
    scored = [(name, error(build((name,), True))) for name in layers]
    return sorted(scored, key=lambda r: r[1])


def fall_back(
    model: nn.Module,
    verdict: dict,
    layers: Sequence[str],
    limit: int,
    build: Build,
    error: Callable[[nn.Module], float],
    judge: Callable[[nn.Module], dict],
    base_error: float | None = None,
) -> Fallback:
    """Keep the most costly of ``layers`` float, one more at a time, until ``judge`` says the model is within
    budget or ``limit`` layers are float. ``model`` and ``verdict``: the all-INT8 model and its judge's verdict;
    ``build(kept, ranking)``: a converted model with ``kept`` float (``ranking``: calibrated on the ranking's
    share of the calibration samples); ``error(model)``: its output error on the held-out samples;
    ``base_error``: the all-INT8 model's, when known."""
    out = Fallback((), model, verdict)
    if out.met or limit <= 0 or not layers:
        return out
    if base_error is None:
        base_error = error(build((), True))
        out.conversions += 1
    ranking = [(n, e) for n, e in rank(layers, build, error) if e < base_error]  # float that helps
    out.ranked, out.conversions = len(layers), out.conversions + len(layers)
    kept: list[str] = []
    rows: list[list] = []
    before = verdict
    for name, err in ranking[:limit]:
        kept.append(name)
        candidate = build(tuple(kept), False)
        now = judge(candidate)
        out.conversions += 1
        rows.append([name, round(base_error, 6), round(err, 6), before["accuracy"], now["accuracy"]])
        before = now
        if now["within_budget"] or now["drop"] < out.verdict["drop"]:  # the best so far: fewer float on a tie
            out.kept, out.model, out.verdict, out.rows = tuple(kept), candidate, now, list(rows)
        if now["within_budget"]:
            break
    out.tried = len(kept)
    return out
