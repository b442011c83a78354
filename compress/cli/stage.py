"""The shape of every model-changing command: load, measure, change, measure, save, show.

Shared so that ``prune``, ``factorize`` and ``quantize`` print the same before/after table and
write the same report.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import OutputExistsError, UsageError
from .common import before_after, emit_json, err, out


@dataclass
class Stage:
    model: nn.Module
    input_shape: tuple
    train: Any = None   # Dataset used for fine-tuning (90% of --train-data)
    val: Any = None     # 10% held out of --train-data: the accuracy the tables show
    test: Any = None    # --test-data
    before: dict = field(default_factory=dict)
    original: nn.Module | None = None


def parse_mapping(text: str | None, what: str, cast=float):
    """'0.9' -> 0.9; 'conv=0.6,linear=0.95' -> {'conv': 0.6, 'linear': 0.95}."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return cast(text)
        outd = {}
        for part in text.split(","):
            k, _, v = part.partition("=")
            outd[k.strip()] = cast(v)
        return outd
    except ValueError as e:
        raise UsageError(f"{what} {text!r}: expected a number or name=value,... ({e})") from e


def check_output(model_path: str, output: str, force: bool) -> None:
    if Path(output).exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    if os.path.abspath(model_path) == os.path.abspath(output) and not force:
        raise OutputExistsError("the output would overwrite the input; choose another -o or pass --force")


def start(model_path: str, output: str | None, force: bool, arch=None, trust_pickle=False, train_data=None,
          test_data=None, input_shape=None, need_train=False, latency=True) -> Stage:
    from .. import data as data_mod
    from ..io import load_model
    from ..metrics import input_shape_of

    if output:
        check_output(model_path, output, force)
    if need_train and not train_data:
        raise UsageError("this method trains: pass --train-data SPEC (e.g. mnist5k)")
    from .common import state

    model = load_model(model_path, arch=arch, trust_pickle=trust_pickle).to(state["device"])
    if not isinstance(model, nn.Module) or model.__class__.__module__.startswith("torch.jit"):
        raise UsageError("TorchScript models cannot be changed; pass a state_dict with --arch or a compress model")
    tr = va = te = None
    if train_data:
        tr, va = data_mod.split(data_mod.load(train_data), 0.1, seed=0)
        data_mod.check_fits(model, tr)
    if test_data:
        te = data_mod.load(test_data)
        data_mod.check_fits(model, te)
    shape = input_shape_of(model, tr or te, input_shape)
    st = Stage(model, shape, tr, va, te, original=copy.deepcopy(model))
    st.before = measure(st, model, latency)
    return st


def measure(st: Stage, model: nn.Module, latency=True) -> dict:
    from ..metrics import summarize
    from ..train import evaluate

    rep = summarize(model, st.input_shape, st.val, latency=latency, layers=True, runs=10)
    if st.test is not None:
        rep["test_accuracy"] = round(evaluate(model, st.test), 3)
    return rep


def finish(st: Stage, model: nn.Module, output: str | None, force: bool, method: str, config=None,
           report_dir: str | None = None, extra: dict | None = None, latency=True) -> dict:
    from ..io import add_history, save_model, set_meta

    model = model.cpu()
    after = measure(st, model, latency)
    entry = {"stage": method, "config": config.to_dict() if config is not None else None,
             "before": _brief(st.before), "after": _brief(after)}
    add_history(model, entry)
    set_meta(model, input_shape=list(st.input_shape))
    if output:
        from .. import distributed

        save_model(model, output, force=force)  # rank 0 writes; the others wait for it
        distributed.barrier()
        after["file_bytes"] = Path(output).stat().st_size
    out.print(before_after(st.before, after, title=f"{method}: before / after"
                           + (" (accuracy on 10% held out of --train-data)" if st.val is not None else "")))
    result = {"method": method, "config": entry["config"], "before": st.before, "after": after, **(extra or {})}
    if report_dir:
        from ..report.render import render_stage_report

        paths = render_stage_report(result, st.original, model, report_dir, force=force)
        err.print(f"report written to {paths['html']}")
    if output:
        err.print(f"wrote {output}")
    return result


def _brief(rep: dict) -> dict:
    keys = ("params", "nonzero_params", "macs", "accuracy", "test_accuracy", "latency_ms")
    return {k: rep[k] for k in keys if k in rep}


def dump(result: dict, json_out: str | None, force: bool) -> None:
    if json_out:
        emit_json(result, json_out, force)
