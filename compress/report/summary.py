"""``compress report``: params, nonzeros, size, MACs, latency and accuracy of one model file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compress import data as data_mod
from compress.cpz.stats import read_stats
from compress.errors import InputError
from compress.export import onnx_summary
from compress.measure import summarize
from compress.meta import read_meta
from compress.method import Context
from compress.model_io import LoadOptions, kind
from compress.scoring import evaluate, resolve_metric


def _data_label(model, spec: str, ds, rep: dict, metric=None) -> str:
    """What the accuracy was measured on. Data the model was trained on (its metadata says so) also
    gets the accuracy of the split it held out, the number that says how it generalises."""
    meta = read_meta(model)
    if meta.train_data != spec:
        return f"{spec}, {len(ds):,} samples"
    vf = meta.val_fraction if meta.val_fraction is not None and 0 < meta.val_fraction < 1 else data_mod.VAL_FRACTION
    _, held = data_mod.split(ds, vf, seed=0)
    rep["heldout_accuracy"] = round(evaluate(model, held, metric), 3)
    rep["heldout_data"] = f"{vf:.0%} of {spec} held out in training, {len(held):,} samples"
    return f"all {len(ds):,} samples of {spec}, including the ones it was trained on"


def model_report(
    path: str | os.PathLike,
    load: LoadOptions | None = None,
    data: str | None = None,
    latency: bool = True,
    test_data: str | None = None,
    metric=None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Everything ``compress report`` shows, as a JSON-able dict. ``load``: how the model is read (arch,
    trust, input shape); ``metric``: how accuracy is scored (``compress.scoring.resolve_metric``);
    ``workers``: loader processes for the data."""
    path, load = Path(path), load or LoadOptions()
    if not path.exists():
        raise InputError(f"{path}: no such file")
    metric = resolve_metric(metric)
    ds = data_mod.load(data, workers) if data else None
    what = kind(path)
    if what == "onnx":
        rep = onnx_summary(path, ds, load.input_shape)
    else:
        model = load.load(path)
        shape = Context(val=ds, input_shape=load.input_shape).shape(model)
        rep = summarize(model, shape, ds, latency=latency, metric=metric)
        meta = read_meta(model)
        if ds is not None:
            rep["accuracy_data"] = _data_label(model, str(data), ds, rep, metric)
        if meta.history:
            rep["history"] = meta.history
        if meta.arch:
            rep["arch"] = meta.arch
        if test_data:
            test = data_mod.load(test_data, workers)
            rep["test_accuracy"] = round(evaluate(model, test, metric), 3)
            rep["metric"] = metric.label
            rep["test_data"] = f"{test_data}, {len(test):,} samples"
        if what == "cpz":
            rep["cpz"] = read_stats(path)
    rep = {"file": str(path), "file_bytes": path.stat().st_size, **rep}
    rep["ratio_vs_dense_fp32"] = (
        round(rep["dense_fp32_bytes"] / rep["file_bytes"], 3) if rep.get("dense_fp32_bytes") else None
    )
    return rep
