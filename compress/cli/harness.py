"""The shape of every model-changing command: load, measure, run the stage, measure, save, show.

Commands only parse options and build a config; ``run_command`` does the rest through the
library's one contract (``compress.method.run``) and prints the ``StageResult`` it returns.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.cli.common import before_after, check_reports, emit_json, err, out, state, use_threads, with_settings
from compress.errors import OutputExistsError, UsageError

if TYPE_CHECKING:  # torch is imported where a command runs: `compress --help` starts without it
    import torch.nn as nn

    from compress.model_io import LoadOptions


@dataclass
class Inputs:
    """What a command loaded: the model and the data splits."""

    model: nn.Module
    train: Any = None  # fine-tuning data (the rest of --train-data)
    val: Any = None  # held out of --train-data (val_fraction of it): the accuracy the tables show
    val_fraction: float = 0.0
    file_bytes: int | None = None  # of the input file
    test: Any = None  # --test-data
    input_shape: tuple | None = None
    before: dict = field(default_factory=dict)
    loss: Any = None  # --loss (resolved), None: cross-entropy
    metric: Any = None  # --metric (resolved ``compress.scoring.Metric``)


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
            if not k.strip():
                raise ValueError("empty name")
            outd[k.strip()] = cast(v)
        return outd
    except ValueError as e:
        raise UsageError(f"{what} {text!r}: expected a number or name=value,... ({e})") from e


def patterns(text: str | None) -> tuple:
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else ()


def check_output(model_path: str, output: str, force: bool) -> None:
    if Path(output).exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    if model_path and os.path.abspath(model_path) == os.path.abspath(output) and not force:
        raise OutputExistsError("the output would overwrite the input; choose another -o or pass --force")


def load_inputs(
    model_path: str,
    output: str | None,
    force: bool,
    load: LoadOptions,
    train_data=None,
    test_data=None,
    need_train=False,
    task=None,
) -> Inputs:
    """Load the model and the data of a command: ``load`` says how the model is read (--arch, --trust-pickle,
    --input-shape), ``task`` its ``TaskOptions`` (--loss, --metric, --workers)."""
    from compress import data as data_mod
    from compress.meta import read_meta
    from compress.scoring import resolve_metric
    from compress.train import resolve_loss

    task = task or TaskOptions()
    loss, metric = resolve_loss(task.loss), resolve_metric(task.metric)  # a bad --metric fails before any work

    if output:
        check_output(model_path, output, force)
    if need_train and not train_data:
        raise UsageError(
            "this method trains: pass --train-data SPEC (e.g. mnist5k), or --epochs 0 to run it "
            "without fine-tuning (and --test-data to see what that costs)"
        )
    model = load.load(model_path)
    import torch.nn as nn

    if not isinstance(model, nn.Module) or model.__class__.__module__.startswith("torch.jit"):
        raise UsageError("TorchScript models cannot be changed; pass a state_dict with --arch or a compress model")
    model = model.to(state["device"])
    inp = Inputs(
        model, input_shape=load.input_shape, file_bytes=Path(model_path).stat().st_size, loss=loss, metric=metric
    )
    if train_data and task.val_data:
        inp.train = check_data(model, data_mod.load(train_data, task.workers), task, metric, training=True)
        inp.val = check_data(model, data_mod.load(task.val_data, task.workers), task, metric)
    elif task.val_data:
        raise UsageError(
            "--val-data is what --train-data's fine-tuning is judged on: give --train-data too "
            "(or --test-data to only measure)"
        )
    elif train_data:
        vf = read_meta(model).val_fraction
        vf = vf if vf is not None and 0.0 < vf < 1.0 else data_mod.VAL_FRACTION  # the model's own split
        inp.train, inp.val = data_mod.split(data_mod.load(train_data, task.workers), vf, seed=0)
        inp.val_fraction = vf
        check_data(model, inp.train, task, metric, training=True)
    if test_data:
        inp.test = check_data(model, data_mod.load(test_data, task.workers), task, metric)
    return inp


def check_data(model: nn.Module, data, task: TaskOptions, metric, training: bool = False):
    """``data`` if it fits the model (``data.check_fits``); class labels are checked only where they are used as
    such: in training data unless the user's --loss takes other targets, in scored data for the built-in metrics."""
    from compress import data as data_mod

    data_mod.check_fits(
        model, data, labels_needed=(task.loss is None or metric.builtin) if training else metric.builtin
    )
    return data


@dataclass
class TaskOptions:
    """--loss, --metric, --workers, --val-data: how the user trains and scores, how their data are read,
    and the validation data when it is not held out of --train-data."""

    loss: str | None = None
    metric: str | None = None
    workers: int | None = None
    val_data: str | None = None


def command_inputs(model_path: str, load, data, dest, runtime, need_train: bool) -> Inputs:
    """The model and data of a command that changes a model, from its option groups (``cli.options``:
    ``ModelOptions``, ``DataOptions``, ``OutputOptions``, ``RunOptions``), on the threads it asks for."""
    use_threads(runtime.threads)
    task = TaskOptions(data.loss, data.metric, data.workers, data.val_data)
    return load_inputs(
        model_path,
        dest.output,
        dest.force,
        load.load(),
        data.train_data,
        data.test_data,
        need_train=need_train,
        task=task,
    )


def cpz_estimate(model: nn.Module, input_shape=None) -> int | None:
    """The bytes ``compress encode`` writes for the model as it stands (with its graph and metadata, encoded in
    memory with the same options): what a .pt's size hides. Call it once the model's metadata is final."""
    from compress.cpz.container import encode_model
    from compress.errors import CompressError

    try:  # (an INT8 model is refused by the container: None)
        return encode_model(copy.deepcopy(model).cpu(), graph=True, input_shape=input_shape)[1]["file_bytes"]
    except CompressError:
        return None


def output_drift(before: nn.Module, after: nn.Module, input_shape, data=None, n: int = 1000) -> dict | None:
    """How far the outputs moved: top-1 agreement with the input model (%) and the relative L2 change
    of the outputs, on the first ``n`` samples of ``data`` (all of it when it is smaller; a few hundred
    samples hide a drop of half a point) in batches of at most 2^21 input values, or, without data, on
    random normal inputs (seeded) -- so that even a command given no labels shows what it did to the model.
    None for a model whose output is not one tensor."""
    import math

    import torch

    from compress.data import batches

    per = max(1, min(256, (1 << 21) // max(1, math.prod(input_shape[1:]))))  # samples a batch
    if data is not None:
        n = min(n, len(data)) if not data.iterable else n
        chunks = (x for x, _ in batches(data, per, None if data.iterable else torch.arange(n)))
    else:
        n = min(n, 256)
        g = torch.Generator().manual_seed(0)
        chunks = (torch.randn((min(per, n - i),) + tuple(input_shape[1:]), generator=g) for i in range(0, n, per))
    same, seen, diff2, norm2 = 0, 0, 0.0, 0.0
    with torch.no_grad():
        before.eval(), after.eval()
        for x in chunks:
            x = x[: n - seen]
            if not len(x):
                break
            a, b = before(x), after(x)
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape):
                return None
            if a.dim() == 2:
                same += int((a.argmax(1) == b.argmax(1)).sum())
            diff2 += float(((b - a).double() ** 2).sum())
            norm2 += float((a.double() ** 2).sum())
            seen += len(x)
            dims = a.dim()
    if not seen:
        return None
    name = f"{seen:,} samples of {data.name}" if data is not None else f"{seen} random inputs"
    agree = 100.0 * same / seen if dims == 2 else None
    rel = math.sqrt(diff2) / max(math.sqrt(norm2), 1e-12)
    return {"data": name, "top1_agreement": None if agree is None else round(agree, 2), "relative_change": rel}


def measure(inp: Inputs, model: nn.Module, calib=None, cpz: bool = True) -> dict:
    """The numbers of ``model`` before or after a stage; ``cpz``: its .cpz bytes too (``cpz_estimate``), else
    None there, for a caller that sets the model's metadata first."""
    from compress.measure import summarize
    from compress.method import Context
    from compress.scoring import evaluate

    try:
        shape = Context(
            train=inp.train, val=inp.test if inp.test is not None else calib, input_shape=inp.input_shape
        ).shape(model)
    except UsageError:
        shape = None  # weight-only stages need no input: no MACs or latency then
    rep = summarize(model, shape, inp.val, latency=False, layers=shape is not None, metric=inp.metric)
    rep["cpz_bytes"] = cpz_estimate(model, inp.input_shape) if cpz else None
    if inp.test is not None:
        rep["test_accuracy"] = round(evaluate(model, inp.test, inp.metric), 3)
        rep["test_data"] = f"{inp.test.name}, {len(inp.test):,} samples"
        rep["metric"] = inp.metric.label
    return rep


def run_command(
    verb: str,
    cfg,
    inp: Inputs,
    dest,
    runtime,
    settings: list[str] | None = None,
    on_event=None,
    extra: dict | None = None,
    calib=None,
) -> dict:
    """Run one stage on loaded inputs, print before/after, save, report. ``dest``, ``runtime``: the command's
    output and run options; ``settings``: its --set overrides of ``cfg``; ``calib``: calibration data (INT8)."""
    from compress.meta import set_meta
    from compress.method import Context, run
    from compress.model_io import save_model

    cfg = with_settings(cfg, settings)
    output, force, report_dir, json_out = dest.output, dest.force, dest.report, dest.json_out
    latency = not runtime.no_latency
    check_reports(report_dir, json_out, force)  # before the work, not after it
    if inp.train is not None and getattr(cfg, "finetune", None) is not None:
        from compress.train import check_augment

        check_augment(cfg.finetune.augment, inp.train)  # the shifts fit the images: said before any work
    original = copy.deepcopy(inp.model)
    inp.before = measure(inp, inp.model, calib)
    inp.before["file_bytes"] = inp.file_bytes
    ctx = Context(
        train=inp.train,
        val=inp.val,
        input_shape=inp.input_shape,
        on_event=on_event,
        loss=inp.loss,
        metric=inp.metric,
        calib=calib,
    )
    res = run(verb, inp.model, cfg, ctx)
    model = res.model.cpu()  # files are always written from CPU
    after = measure(inp, model, calib, cpz=False)  # its .cpz bytes once its metadata is final, below
    # quantized weights are decoded to FP32 on the CPU: a smaller file, the same computation, so no speed
    # verdict is due (INT8 execution -- the int8 method, ONNX Runtime's `export --int8` -- computes in integers)
    after["weights_only"] = verb == "quantize" and "int8" not in after
    if after.get("input_shape"):
        after["drift"] = output_drift(
            original.cpu(), model, after["input_shape"], inp.val if inp.val is not None else inp.test
        )
        set_meta(model, input_shape=list(after["input_shape"]))  # the file it writes says the shape it takes
    if after.get("input_shape") and latency:  # before and after timed interleaved, after a warm-up until stable
        from compress.measure import latencies

        inp.before["latency_ms"], after["latency_ms"] = latencies([original.cpu(), model], after["input_shape"])
    after["cpz_bytes"] = cpz_estimate(model, inp.input_shape)  # with the metadata the file carries: what encode writes
    if output:
        from compress import distributed

        save_model(model, output, force=force)  # rank 0 writes; the others wait for it
        distributed.barrier()
        after["file_bytes"] = Path(output).stat().st_size
    what = inp.metric.label.removesuffix(" %")
    held = (
        f"{inp.val_fraction:.0%} held out of --train-data"
        if inp.val_fraction
        else f"--val-data {inp.val.name}"
        if inp.val is not None
        else ""
    )
    title = f"{verb}/{res.stage}: before / after" + (
        f" ({what} on {held}, {len(inp.val):,} samples)" if inp.val is not None else ""
    )
    out.print(before_after(inp.before, after, title=title))
    for note in res.notes:
        err.print(f"note: {note}")
    if inp.val is None and inp.test is None:  # a heavily pruned model can score near chance and nothing would say so
        err.print(
            "warning: no --train-data or --test-data: nothing was fine-tuned and the accuracy after this "
            "change was not measured; pass --test-data (or --train-data) to see what it cost"
        )
    if "macs" not in after:
        err.print("note: no input shape known, so no MACs or latency; pass --input-shape 1,C,H,W or --train-data")
    result = {
        "method": f"{verb}/{res.stage}",
        "config": res.config,
        "before": inp.before,
        "after": after,
        "layers_changed": res.layers,
        "records": res.records,
        "notes": res.notes,
        **(extra or {}),
    }
    if report_dir:
        from compress.report.render import render_stage_report

        paths = render_stage_report(result, original, model, report_dir, force=force)
        err.print(f"report written to {paths['html']}")
    if output:
        err.print(f"wrote {output}")
    if json_out:
        emit_json(result, json_out, force)
    return result
