"""Deep Compression end to end, under an accuracy budget.

A recipe is a list of stages. A stage whose setting is a list is a *search*: its candidates are
tried in order of increasing compression and the last one whose validation accuracy stays within
the budget is kept (threshold pruning goes on from the previous candidate, as Han et al.'s
iterative pruning does, and stops after ``patience`` (2) candidates in a row over budget; other
stages start each candidate from the stage's input). The budget is measured on a validation split
held out from the training data -- never on test data -- and tested with a margin for noise: a
candidate is within budget when its accuracy drop plus ``confidence`` (default 1) standard errors
of the paired difference stays within it. Picking the most compressed candidate whose noisy drop
happens to look small would otherwise overshoot the budget on new data (the winner's curse). The last
step always Huffman-codes the result into a .cpz, and the bytes after each stage are recorded.

Default recipe (Han et al., Deep Compression, ICLR 2016): iterative threshold pruning with
fine-tuning, k-means weight sharing with centroid fine-tuning (conv 8 / fc 5 bits, searched
downwards), Huffman coding.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from . import data as data_mod
from .coding.container import encode_model
from .config import Config
from .errors import UsageError
from .factorize import FactorizeConfig
from .io import add_history
from .metrics import count_nonzero, count_params
from .prune import ChannelUnionConfig, L1FilterConfig, ThresholdConfig, prune_
from .quantize import QuantConfig, quantize_
from .train import predict

log = logging.getLogger(__name__)

DEFAULT_RECIPE: dict[str, Any] = {
    "val_fraction": 0.1,
    "stage": [
        {"type": "threshold", "sparsity": [0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98], "epochs": 3},
        {"type": "kmeans", "bits": [{"conv": 8, "linear": 5}, {"conv": 6, "linear": 4}, {"conv": 5, "linear": 4},
                                    {"conv": 4, "linear": 3}], "epochs": 1},
    ],
}

_TYPES = {"threshold": ThresholdConfig, "l1-filter": L1FilterConfig, "channel-union": ChannelUnionConfig,
          "factorize": FactorizeConfig, "kmeans": QuantConfig, "quantize": QuantConfig, "int8": QuantConfig}
_NOT_OPTIONS = ("type", "patience")  # stage keys that are not config options
_SEARCH_KEYS = {"threshold": "sparsity", "l1-filter": "ratio", "channel-union": "lasso_ratio",
                "factorize": "energy", "kmeans": "bits", "quantize": "bits", "int8": "bits"}


@dataclass
class StageResult:
    name: str
    kept: dict | None
    tried: list[dict] = field(default_factory=list)
    bytes: int = 0
    accuracy: float = 0.0
    seconds: float = 0.0


def load_recipe(path) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except FileNotFoundError as e:
        raise UsageError(f"recipe {path} not found") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe {path}: {e}") from e
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: dict) -> None:
    stages = recipe.get("stage")
    if not isinstance(stages, list) or not stages:
        raise UsageError("a recipe needs at least one [[stage]]")
    for i, st in enumerate(stages):
        t = st.get("type")
        if t not in _TYPES:
            raise UsageError(f"stage {i + 1}: unknown type {t!r}; known: {', '.join(_TYPES)}")
        for cand in _candidates(st):
            _config(t, cand)  # raises UsageError on bad options


def _candidates(stage: dict) -> list[dict]:
    t = stage["type"]
    key = _SEARCH_KEYS[t]
    body = {k: v for k, v in stage.items() if k not in _NOT_OPTIONS}
    vals = body.get(key)
    if isinstance(vals, list):
        return [{**body, key: v} for v in vals]
    return [body]


def _config(t: str, opts: dict) -> Config:
    opts = dict(opts)
    if t == "kmeans":
        opts["scheme"] = "kmeans"
    elif t == "int8":
        opts.setdefault("bits", 8)
        opts.setdefault("scheme", "minmax")
    if "layers" in opts and isinstance(opts["layers"], list):
        opts["layers"] = tuple(opts["layers"])
    try:
        return _TYPES[t](**opts)
    except (TypeError, ValueError) as e:
        raise UsageError(f"stage {t}: {e}") from e


def _apply(model: nn.Module, cfg: Config, train, val, input_shape) -> nn.Module:
    if isinstance(cfg, ThresholdConfig):
        prune_(model, cfg, train, val)
    elif isinstance(cfg, (L1FilterConfig, ChannelUnionConfig)):
        prune_(model, cfg, train, val, input_shape=input_shape)
    elif isinstance(cfg, FactorizeConfig):
        from .factorize import factorize

        factorize(model, cfg, train, val)
    else:
        quantize_(model, cfg, train, val)
    return model


def paired_drop(base_pred, cand_pred, y) -> tuple[float, float]:
    """Accuracy drop (points) of a candidate vs the base on the same samples, and its standard
    error from the discordant pairs (McNemar): se = sqrt(b + c - (b - c)^2 / n) / n."""
    ok_b, ok_c = base_pred == y, cand_pred == y
    n = len(y)
    b = int((ok_b & ~ok_c).sum())
    c = int((~ok_b & ok_c).sum())
    drop = 100.0 * (b - c) / n
    se = 100.0 * max(b + c - (b - c) ** 2 / n, 0.0) ** 0.5 / n
    return drop, se


def size_bytes(model: nn.Module) -> dict[str, int]:
    """Encoded .cpz size, and the size the same content takes without Huffman coding."""
    blob, stats = encode_model(copy.deepcopy(model))
    fixed = 0
    for e in stats["tensors"]:
        if "values" in e:
            fixed += e.get("params_bytes", 0) + e.get("index_bytes", 0) + e["values"]["fixed_bytes"]
        else:
            fixed += e["length"]
    return {"coded": len(blob), "fixed": fixed + stats["manifest_bytes"] + 20}


def pipeline(model: nn.Module, data, recipe: dict | None = None, max_accuracy_drop: float = 0.5,
             input_shape=None, on_event=None) -> tuple[nn.Module, dict[str, Any]]:
    """Run a recipe on ``model`` (in place); returns (model, summary). ``data`` is a Dataset or spec."""
    recipe = recipe or DEFAULT_RECIPE
    check_recipe(recipe)
    ds = data_mod.load(data) if isinstance(data, str) else data
    train, val = data_mod.split(ds, float(recipe.get("val_fraction", 0.1)), seed=0)
    budget = float(recipe.get("max_accuracy_drop", max_accuracy_drop))
    z = float(recipe.get("confidence", 1.0))
    base_pred = predict(model, val.x).argmax(1)
    base_acc = 100.0 * float((base_pred == val.y).float().mean())
    shape = input_shape or (1,) + tuple(ds.x.shape[1:])
    dense = 4 * count_params(model)
    timeline = [{"stage": "dense fp32", "bytes": dense, "accuracy": base_acc, "params": count_params(model),
                 "nonzeros": count_nonzero(model)}]
    emit = on_event or (lambda kind, **kw: None)
    emit("start", accuracy=base_acc, bytes=dense, budget=budget)
    results = []
    from .io import get_meta

    trained_augment = int(get_meta(model).get("augment", 0))
    measured = None  # (sizes, val accuracy) of `model`, taken when it was a candidate
    for st in recipe["stage"]:
        t = st["type"]
        if t == "threshold" and "augment" not in st:
            st = {**st, "augment": trained_augment}  # fine-tune as the model was trained
        t0 = time.perf_counter()
        cands = _candidates(st)
        kept_model, kept, kept_measure = None, None, None
        current = model
        misses = 0
        sr = StageResult(name=t, kept=None)
        for j, opts in enumerate(cands):
            cfg = _config(t, opts)
            start = current if t == "threshold" else model
            cand = _apply(copy.deepcopy(start), cfg, train, val, shape)
            pred = predict(cand, val.x).argmax(1)
            acc = 100.0 * float((pred == val.y).float().mean())
            drop, se = paired_drop(base_pred, pred, val.y)
            sizes = size_bytes(cand)
            rec = {"options": cfg.to_dict(), "accuracy": round(acc, 3), "drop": round(drop, 3), "se": round(se, 3),
                   "bytes": sizes["coded"], "within_budget": drop + z * se <= budget}
            sr.tried.append(rec)
            emit("candidate", stage=t, index=j + 1, of=len(cands), **rec)
            if not rec["within_budget"]:
                misses += 1
                if t == "threshold":
                    # sparser candidates build on this one, with more fine-tuning; one reading over
                    # budget may be noise, two in a row end the search
                    if misses >= int(st.get("patience", 2)):
                        break
                    current = cand
                continue
            misses = 0
            if kept is None or sizes["coded"] <= kept["bytes"]:
                kept_model, kept, kept_measure = cand, rec, (sizes, acc)
            current = cand
        if kept_model is None:
            emit("skipped", stage=t)
            log.warning("stage %s: no candidate within %.2f pt; stage skipped", t, budget)
        else:
            model, measured = kept_model, kept_measure
        if measured is None:  # nothing kept yet: the input model, measured once
            measured = (size_bytes(model), base_acc)
        sr.kept = kept
        sr.seconds = round(time.perf_counter() - t0, 2)
        sizes, sr.accuracy = measured
        sr.bytes = sizes["coded"]
        label = {"threshold": "pruned", "kmeans": "quantized", "quantize": "quantized", "int8": "quantized"}.get(t, t)
        timeline.append({"stage": label, "bytes": sizes["fixed"] if label == "quantized" else sizes["coded"],
                         "accuracy": sr.accuracy, "params": count_params(model), "nonzeros": count_nonzero(model)})
        results.append(sr)
    final = measured[0] if measured else size_bytes(model)
    timeline.append({"stage": "huffman coded", "bytes": final["coded"], "accuracy": timeline[-1]["accuracy"],
                     "params": count_params(model), "nonzeros": count_nonzero(model)})
    summary = {"budget_pt": budget, "confidence": z, "base_accuracy": round(base_acc, 3), "final_accuracy": round(timeline[-1]["accuracy"], 3),
               "dense_bytes": dense, "cpz_bytes": final["coded"], "ratio": round(dense / final["coded"], 2),
               "timeline": timeline,
               "stages": [{"stage": r.name, "kept": r.kept, "tried": r.tried, "bytes": r.bytes,
                           "accuracy": round(r.accuracy, 3), "seconds": r.seconds} for r in results]}
    add_history(model, {"stage": "pipeline", "ratio": summary["ratio"], "budget_pt": budget,
                        "kept": [r.kept["options"] if r.kept else None for r in results]})
    return model, summary
