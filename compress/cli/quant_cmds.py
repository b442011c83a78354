"""``compress quantize`` and ``compress export``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app
from . import common as c
from .common import emit_json, err, load_options, make_config, out, table, use_threads, with_settings
from .harness import TaskOptions, check_output, load_inputs, parse_mapping, patterns, run_command


@app.command()
def quantize(model: c.ModelArg, output: c.OutOpt,
             bits: Annotated[str, typer.Option("--bits", help="Bits per weight (2..8), or per layer/type: "
                                               "conv=8,linear=5.")] = "8",
             scheme: Annotated[str, typer.Option("--scheme", help="A registered scheme (compress.quantize.SCHEMES): "
                                                 "minmax (grid over each channel's range), mmse (grid clipped at the "
                                                 "least squared error), kmeans (a shared codebook per layer), pow2 "
                                                 "(0 or ±s·2^-i per layer).")] = "minmax",
             per_tensor: Annotated[bool, typer.Option("--per-tensor", help="One grid per tensor, not per channel.")] = False,
             affine: Annotated[bool, typer.Option("--affine", help="Affine grid with a zero point.")] = False,
             activations: Annotated[bool, typer.Option(
                 "--activations", help="Static INT8 of weights and activations that PyTorch runs as integers "
                 "(x86 kernels; activation ranges from --calib-data).")] = False,
             observer: Annotated[str, typer.Option("--observer", help="--activations: how activation ranges are "
                                                   "set: histogram (least error) or minmax.")] = "histogram",
             calib_data: Annotated[Optional[str], typer.Option(
                 "--calib-data", help="--activations: calibration data spec (512 samples are read).")] = None,
             layers: c.LayersOpt = None, exclude: c.ExcludeOpt = None,
             arch: c.ArchOpt = None, trust_pickle: c.TrustOpt = False, train_data: c.TrainDataOpt = None,
             test_data: c.TestDataOpt = None,
             epochs: Annotated[Optional[float], typer.Option(
                 "--epochs", min=0, help="k-means: epochs of centroid training (needs --train-data).")] = 0.0,
             lr: Annotated[float, typer.Option("--lr", help="k-means centroid learning rate.")] = 1e-4,
             input_shape: c.InputShapeOpt = None, report: c.ReportOpt = None, json_out: c.JsonOpt = None,
             no_latency: c.NoLatencyOpt = False, threads: c.ThreadsOpt = None, loss: c.LossOpt = None, val_data: c.ValDataOpt = None,
             metric: c.MetricOpt = None, workers: c.WorkersOpt = None, distill: c.DistillOpt = None,
             settings: c.SetOpt = None, force: c.ForceOpt = False):
    """Quantize weights per channel (min-max, MMSE clipping) or by k-means weight sharing.

    Examples:

        compress quantize lenet5.pt --bits 4 --scheme mmse --test-data mnist5k -o lenet5-int4.pt

        compress quantize lenet5.pt --bits conv=8,linear=5 --scheme kmeans --train-data mnist5k --epochs 1 -o l5-km.pt

        compress quantize resnet20.pt --activations --calib-data "mnist5k?size=32" --test-data "mnist5k?size=32" -o r20-int8.pt
    """
    if activations:
        if bits != "8" or scheme != "minmax" or per_tensor or affine or epochs or layers:
            raise typer.BadParameter("--activations is static INT8 (per-channel weights) of every conv and linear "
                                     "but those --exclude keeps float: leave --bits, --scheme, --per-tensor, "
                                     "--affine, --epochs and --layers at their defaults")
        use_threads(threads)
        return _int8(model, output, load_options(arch, trust_pickle, input_shape), calib_data or train_data, test_data,
                     observer, patterns(exclude),
                     workers, no_latency, json_out, force)
    from ..config import Select
    from ..quantize import QuantConfig

    ft = make_config(QuantConfig.part, "finetune", epochs=epochs, lr=lr, distill=distill)
    cfg = make_config(QuantConfig, bits=parse_mapping(bits, "--bits", cast=int), scheme=scheme,
                      per_channel=not per_tensor, symmetric=not affine, finetune=ft,
                      select=make_config(Select, names=patterns(layers), exclude=patterns(exclude),
                                         spare_first_last=False))
    use_threads(threads)
    inp = load_inputs(model, output, force, load_options(arch, trust_pickle, input_shape), train_data, test_data,
                      need_train=bool(epochs), task=TaskOptions(loss, metric, workers, val_data))
    cfg = with_settings(cfg, settings)
    res = run_command("quantize", cfg, inp, output, force, report, json_out, latency=not no_latency)
    rows = res["layers_changed"]
    out.print(table("layers", ["layer", "bits", "scheme", "weight MSE", "SQNR dB", "zeros"],
                    [[r["name"], r["bits"], r["scheme"], r["mse"], r["sqnr_db"], r["zeros"]] for r in rows]))


@app.command()
def export(model: c.ModelArg, output: c.OutOpt, arch: c.ArchOpt = None, trust_pickle: c.TrustOpt = False,
           input_shape: c.InputShapeOpt = None,
           int8: Annotated[bool, typer.Option("--int8", help="ONNX Runtime static INT8 quantization (QDQ).")] = False,
           calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="Calibration data spec.")] = None,
           data: c.DataOpt = None,
           tol: Annotated[float, typer.Option("--tol", help="Max difference allowed vs PyTorch, relative to the largest output.")] = 1e-4,
           threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime threads for timing.")] = 2,
           workers: c.WorkersOpt = None, json_out: c.JsonOpt = None, force: c.ForceOpt = False):
    """Export to ONNX (dynamic batch), checked against PyTorch; --int8 for ONNX Runtime INT8.

    Examples:

        compress export resnet20.pt -o resnet20.onnx

        compress export resnet20.pt --int8 --calib-data "mnist5k?size=32&limit=512" --data "mnist5k?size=32" -o r20-int8.onnx
    """
    from .. import data as data_mod
    from ..export import export as run
    from ..stages import Context

    check_output(model, output, force)
    load = load_options(arch, trust_pickle, input_shape)
    m = load.load(model)
    calib = data_mod.load(calib_data, workers) if calib_data else None
    ev = data_mod.load(data, workers) if data else None
    shape = Context(train=calib, val=ev, input_shape=load.input_shape).shape(m)
    res = run(m, output, shape, int8=int8, calib_data=calib, eval_data=ev, tol=tol, force=force, threads=threads,
              on_step=lambda text: err.print(f"{text} ..."))
    rows = [["max |onnx - torch|", f"{res['max_abs_diff']:.2e}", "", ""],
            ["FP32 ONNX", res["fp32"]["bytes"], res["fp32"]["latency_ms_batch_32"], res["fp32"].get("accuracy")]]
    if int8:
        rows.append(["INT8 ONNX (QDQ)", res["int8"]["bytes"], res["int8"]["latency_ms_batch_32"],
                     res["int8"].get("accuracy")])
    out.print(table(f"export -> {output}", ["", "bytes", f"latency batch 32 ms ({threads} threads)", "accuracy %"], rows))
    if int8:
        out.print(f"INT8 is {res['int8_speedup']:.2f}x faster than FP32 at batch 32")
    err.print(f"wrote {output}")
    if json_out:
        emit_json(res, json_out, force)


def _int8(model, output, load, calib_spec, test_spec, observer, keep_float, workers, no_latency,
          json_out, force) -> None:
    """``quantize --activations``: the model lowered to INT8 that PyTorch executes, with its before/after numbers."""
    from .. import data as data_mod
    from ..formats import save_model
    from ..metrics import latencies, speed_change
    from ..quantize.int8 import to_int8
    from ..stages import Context
    from ..train import evaluate
    from .harness import check_output

    check_output(model, output, force)
    if not calib_spec:
        raise typer.BadParameter("--activations needs --calib-data (or --train-data) for the activation ranges")
    m = load.load(model)
    calib = data_mod.load(calib_spec, workers)
    shape = Context(train=calib, input_shape=load.input_shape).shape(m)
    q = to_int8(m, calib, shape, observer=observer, keep_float=keep_float)
    save_model(q, output, force=force)
    made = q.compress_int8
    res: dict = {"file": str(output), "int8": made, "bytes": {"fp32": Path(model).stat().st_size,
                                                                         "int8": Path(output).stat().st_size}}
    rows = [["file bytes", f"{res['bytes']['fp32']:,}", f"{res['bytes']['int8']:,}", ""]]
    if test_spec:
        test = data_mod.load(test_spec, workers)
        acc = [evaluate(m, test), evaluate(q, test)]
        res["accuracy"] = {"fp32": acc[0], "int8": acc[1], "data": f"{test_spec}, {len(test):,} samples"}
        rows.append([f"top-1 % on {test_spec}", f"{acc[0]:.2f}", f"{acc[1]:.2f}", f"{acc[1] - acc[0]:+.2f} pt"])
    if not no_latency:
        fp, i8 = latencies([m, q], shape)
        verdict = speed_change(fp["batch_32"], i8["batch_32"], i8["speedup"]["batch_32"])
        res["latency_ms_batch_32"] = {"fp32": fp["batch_32"], "int8": i8["batch_32"], "verdict": verdict}
        rows.append(["latency batch 32 ms", f"{fp['batch_32']:.2f}", f"{i8['batch_32']:.2f}", verdict])
    out.print(table(f"INT8 ({observer} activations, calibrated on {made['calibration']})",
                    ["", "FP32", "INT8", "change"], rows))
    if made["keep_float"]:
        err.print(f"kept in float: {', '.join(made['keep_float'])}")
    err.print(f"wrote {output}")
    if json_out:
        emit_json(res, json_out, force)
