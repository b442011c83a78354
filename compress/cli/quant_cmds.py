"""``compress quantize`` and ``compress export``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compress.cli import app
from compress.cli import common as c
from compress.cli.common import emit_json, err, load_options, make_config, out, table, use_threads, with_settings
from compress.cli.harness import TaskOptions, check_output, load_inputs, parse_mapping, patterns, run_command
from compress.errors import INT8_IS_PT


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
                                                   "set: histogram (least error), minmax, or percentile (99.99th "
                                                   "of each batch; outliers saturate).")] = "histogram",
             calib_data: Annotated[Optional[str], typer.Option(
                 "--calib-data", help="--activations: calibration data spec (512 samples are read).")] = None,
             layers: c.LayersOpt = None, exclude: c.ExcludeOpt = None,
             arch: c.ArchOpt = None, trust_pickle: c.TrustOpt = False, train_data: c.TrainDataOpt = None,
             test_data: c.TestDataOpt = None,
             epochs: Annotated[Optional[float], typer.Option(
                 "--epochs", min=0, help="k-means: epochs of centroid training; --activations: epochs of "
                 "quantization-aware training (fake-quantized, then converted); both need --train-data.")] = 0.0,
             lr: Annotated[float, typer.Option("--lr", help="k-means centroid / QAT learning rate.")] = 1e-4,
             input_shape: c.InputShapeOpt = None, report: c.ReportOpt = None, json_out: c.JsonOpt = None,
             no_latency: c.NoLatencyOpt = False, threads: c.ThreadsOpt = None, loss: c.LossOpt = None, val_data: c.ValDataOpt = None,
             metric: c.MetricOpt = None, workers: c.WorkersOpt = None, distill: c.DistillOpt = None,
             settings: c.SetOpt = None, force: c.ForceOpt = False):
    """Quantize weights (min-max, MMSE clipping, k-means sharing, powers of two: smaller file, same FP32 compute),
    or with --activations lower the model to INT8 that PyTorch runs as integers (PTQ; QAT with --epochs).

    Examples:

        compress quantize lenet5.pt --bits 4 --scheme mmse --test-data mnist5k -o lenet5-int4.pt

        compress quantize lenet5.pt --bits conv=8,linear=5 --scheme kmeans --train-data mnist5k --epochs 1 -o l5-km.pt

        compress quantize resnet20.pt --activations --calib-data "mnist5k?size=32" --test-data "mnist5k?size=32" -o r20-int8.pt

        compress quantize mbv2.pt --activations --epochs 1 --train-data "mnist5k?size=32&channels=3" -o mbv2-qat.pt
    """
    if activations:
        if bits != "8" or scheme != "minmax" or per_tensor or affine:
            raise typer.BadParameter("--activations is static INT8 (per-channel int8 weights, uint8 activations): "
                                     "leave --bits, --scheme, --per-tensor and --affine at their defaults")
        if not (calib_data or train_data):
            raise typer.BadParameter("--activations needs --calib-data (or --train-data) for the activation ranges")
        if output.endswith(".cpz"):  # before the work, not after it
            raise typer.BadParameter(f"{INT8_IS_PT}: give -o NAME.pt")
        from compress.config import Select
        from compress.quantize.int8_stage import Int8Config

        cfg8 = make_config(Int8Config, observer=observer,
                           select=make_config(Select, names=patterns(layers), exclude=patterns(exclude),
                                              spare_first_last=False),
                           finetune=make_config(Int8Config.part, "finetune", epochs=epochs, lr=lr, distill=distill))
        use_threads(threads)
        inp = load_inputs(model, output, force, load_options(arch, trust_pickle, input_shape), train_data, test_data,
                          need_train=bool(epochs), task=TaskOptions(loss, metric, workers, val_data))
        calib = _calibration(inp, calib_data, workers)
        res = run_command("quantize", with_settings(cfg8, settings), inp, output, force, report, json_out,
                          latency=not no_latency, calib=calib)
        made = res["after"]["int8"]
        err.print(f"INT8 ({made['observer'] if 'qat' not in made else 'quantization-aware: ' + made['qat']}; "
                  f"activation ranges from {made['calibration']}); {made['executes']}")
        return
    from compress.config import Select
    from compress.quantize import QuantConfig

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
           threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime / OpenVINO threads for timing.")] = 2,
           fmt: Annotated[Optional[str], typer.Option(
               "--format", help="onnx, or openvino (IR: NAME.xml + NAME.bin; needs compress[openvino]); default: "
               "from the output's suffix (.xml: openvino).")] = None,
           workers: c.WorkersOpt = None, json_out: c.JsonOpt = None, force: c.ForceOpt = False):
    """Export to ONNX (dynamic batch) or OpenVINO IR, checked against PyTorch; --int8 for static INT8 (QDQ,
    calibrated), which ONNX Runtime and OpenVINO run as integers.

    Examples:

        compress export resnet20.pt -o resnet20.onnx

        compress export resnet20.pt --int8 --calib-data "mnist5k?size=32&limit=512" --data "mnist5k?size=32" -o r20-int8.onnx

        compress export resnet20.pt --int8 --format openvino --calib-data "mnist5k?size=32&limit=512" -o r20-int8.xml
    """
    from compress import data as data_mod
    from compress.export import export as run
    from compress.method import Context

    check_output(model, output, force)
    load = load_options(arch, trust_pickle, input_shape)
    m = load.load(model)
    calib = data_mod.load(calib_data, workers) if calib_data else None
    ev = data_mod.load(data, workers) if data else None
    shape = Context(train=calib, val=ev, input_shape=load.input_shape).shape(m)
    fmt = fmt or ("openvino" if Path(output).suffix == ".xml" else "onnx")
    res = run(m, output, shape, int8=int8, calib_data=calib, eval_data=ev, tol=tol, force=force, threads=threads,
              on_step=lambda text: err.print(f"{text} ..."), fmt=fmt)
    rows = [["max |onnx - torch|", f"{res['max_abs_diff']:.2e}", "", ""],
            ["FP32 ONNX Runtime", res["fp32"]["bytes"], res["fp32"]["latency_ms_batch_32"], res["fp32"].get("accuracy")]]
    if int8:
        rows.append(["INT8 ONNX Runtime (QDQ)", res["int8"]["bytes"], res["int8"]["latency_ms_batch_32"],
                     res["int8"].get("accuracy")])
    for kind, r in res.get("openvino", {}).items():
        if isinstance(r, dict):  # an IR is two files: its bytes are both
            rows.append([f"{kind.upper()} OpenVINO IR (.xml {r['xml_bytes']:,} + .bin {r['bin_bytes']:,})", r["bytes"],
                         r["latency_ms_batch_32"], r.get("accuracy")])
    acc = f"accuracy % ({data})" if ev is not None else "accuracy %"
    out.print(table(f"export -> {output}", ["", "bytes", f"latency batch 32 ms ({threads} threads)", acc], rows))
    if "int8" in res.get("openvino", {}):
        n, total = res["openvino"]["int8"]["int8_layers"]
        out.print(f"OpenVINO runs {n} of its {total} convolutions and matrix products in 8-bit integers")
        if res["openvino"]["int8"].get("size_note"):
            out.print(f"INT8 OpenVINO IR: {res['openvino']['int8']['size_note']}")
    for runtime, r in (("ONNX Runtime", res), ("OpenVINO", res.get("openvino", {}))):
        if "int8_verdict" in r:  # interleaved runs: "faster" only when the 95% interval says so
            out.print(f"INT8 vs FP32 in {runtime}, batch 32: {r['int8_verdict']}")
    err.print(f"wrote {output}")
    if json_out:
        emit_json(res, json_out, force)


def _calibration(inp, calib_spec, workers):
    """--calib-data (checked against the model), else None: the stage calibrates on --train-data's part."""
    if not calib_spec:
        return None
    from compress import data as data_mod

    calib = data_mod.load(calib_spec, workers)
    data_mod.check_fits(inp.model, calib, labels_needed=False)
    return calib
