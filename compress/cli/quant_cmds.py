"""``compress quantize`` (its options made from QuantConfig and Int8Config, ``config_options``) and
``compress export``."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer

from compress.cli.app import app
from compress.cli.common import emit_json, err, out, table
from compress.cli.config_options import ConfigOptions, Field
from compress.cli.harness import check_output, command_inputs, run_command
from compress.cli.options import (
    DATA,
    METHOD,
    OUTPUT,
    CalibDataOpt,
    Command,
    DataOpt,
    DataOptions,
    ForceOpt,
    JsonOpt,
    LazyCommand,
    ModelArg,
    ModelOptions,
    OutOpt,
    OutputOptions,
    RunOptions,
    SetOpt,
    WorkersOpt,
    flag,
    grouped,
    lazy,
    option,
)
from compress.errors import INT8_IS_PT

ACTIVATIONS = "--activations"
# How quantize spells some config fields; every other field is an option as its config declares it.
FIELDS = {
    "per_channel": Field("--per-tensor", invert=True, help="One grid per tensor, not per channel."),
    "symmetric": Field("--affine", invert=True, help="Affine grid with a zero point."),
    "epochs": Field(
        kw={"min": 0},
        help="k-means: epochs of centroid training; --activations: epochs of "
        "quantization-aware training (fake-quantized, then converted); both need --train-data.",
    ),
}
HIDDEN = {"bias_bits", "percentile", "calib_samples", "freeze"}  # left to --set and recipes


@functools.cache
def spec() -> ConfigOptions:
    from compress.quantize import QuantConfig
    from compress.quantize.int8_stage import Int8Config

    return ConfigOptions({"weights": QuantConfig, ACTIVATIONS: Int8Config}, FIELDS, HIDDEN)


def _options() -> list[inspect.Parameter]:
    def kw(name, annotation, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    return [
        kw(
            "activations",
            Annotated[
                bool,
                flag(
                    ACTIVATIONS,
                    panel=METHOD,
                    help="Static INT8 of weights and "
                    "activations that PyTorch runs as integers (x86 kernels; "
                    "activation ranges from --calib-data).",
                ),
            ],
            False,
        ),
        *spec().params(),
        kw(
            "calib_data",
            Annotated[
                str | None,
                option("--calib-data", panel=DATA, help="--activations: calibration data spec (512 samples are read)."),
            ],
            None,
        ),
    ]


@app.command(cls=LazyCommand)
@lazy(_options)
def quantize(
    model: ModelArg,
    *,
    load: ModelOptions,
    data: DataOptions,
    settings: SetOpt = None,
    dest: OutputOptions,
    runtime: RunOptions,
    **kw,
):
    """Quantize weights (min-max, MMSE clipping, k-means sharing, powers of two: smaller file, same FP32 compute),
    or with --activations lower the model to INT8 that PyTorch runs as integers (PTQ; QAT with --epochs).

    Examples:

        compress quantize lenet5.pt --bits 4 --scheme mmse --test-data mnist5k -o lenet5-int4.pt

        compress quantize lenet5.pt --bits conv=8,linear=5 --scheme kmeans --train-data mnist5k --epochs 1 -o l5-km.pt

        compress quantize resnet20.pt --activations --calib-data "mnist5k?size=32" --test-data "mnist5k?size=32" -o r20-int8.pt

        compress quantize mbv2.pt --activations --epochs 1 --train-data "mnist5k?size=32&channels=3" -o mbv2-qat.pt
    """
    s = spec()
    if kw.pop("activations"):
        if (
            kw["bits"] != "8" or kw["scheme"] != "minmax" or kw["per_channel"] or kw["symmetric"]
        ):  # (--per-tensor, --affine)
            raise typer.BadParameter(
                "--activations is static INT8 (per-channel int8 weights, uint8 activations): "
                "leave --bits, --scheme, --per-tensor and --affine at their defaults"
            )
        if not (kw["calib_data"] or data.train_data):
            raise typer.BadParameter("--activations needs --calib-data (or --train-data) for the activation ranges")
        if dest.output.endswith(".cpz"):  # before the work, not after it
            raise typer.BadParameter(f"{INT8_IS_PT}: give -o NAME.pt")
        cfg8 = s.config(ACTIVATIONS, kw)
        inp = command_inputs(model, load, data, dest, runtime, need_train=bool(kw["epochs"]))
        calib = _calibration(inp, kw["calib_data"], data.workers)
        res = run_command("quantize", cfg8, inp, dest, runtime, settings, calib=calib)
        made = res["after"]["int8"]
        how = made["observer"] if "qat" not in made else "quantization-aware: " + made["qat"]
        if made.get("observer_errors"):
            how = f"observer {how}, the closest to FP32 of " + ", ".join(r[0] for r in made["observer_errors"])
        err.print(f"INT8 ({how}; activation ranges from {made['calibration']}); {made['executes']}")
        if made.get("engine_note"):
            err.print(f"INT8 on torch.ao's FX flow: {made['engine_note']}")
        return
    if kw["max_accuracy_drop"] is not None:
        raise typer.BadParameter(
            "--max-accuracy-drop is the budget of --activations (INT8 layers kept float to meet it); a budget "
            "for weight quantization is compress pipeline's"
        )
    cfg = s.config("weights", kw)
    inp = command_inputs(model, load, data, dest, runtime, need_train=bool(kw["epochs"]))
    res = run_command("quantize", cfg, inp, dest, runtime, settings)
    rows = res["layers_changed"]
    out.print(
        table(
            "layers",
            ["layer", "bits", "scheme", "weight MSE", "SQNR dB", "code entropy (bits)", "zeros"],
            [[r["name"], r["bits"], r["scheme"], r["mse"], r["sqnr_db"], r["entropy_bits"], r["zeros"]] for r in rows],
        )
    )


@app.command(cls=Command)
@grouped
def export(
    model: ModelArg,
    output: OutOpt,
    load: ModelOptions,
    int8: Annotated[bool, flag("--int8", panel=METHOD, help="ONNX Runtime static INT8 quantization (QDQ).")] = False,
    calib_data: CalibDataOpt = None,
    data: DataOpt = None,
    tol: Annotated[
        float, option("--tol", panel=METHOD, help="Max difference allowed vs PyTorch, relative to the largest output.")
    ] = 1e-4,
    threads: Annotated[int, option("--threads", panel=OUTPUT, help="ONNX Runtime / OpenVINO threads for timing.")] = 2,
    fmt: Annotated[
        str | None,
        option(
            "--format",
            panel=METHOD,
            help="onnx, or openvino (IR: NAME.xml + NAME.bin; needs compress[openvino]); default: "
            "from the output's suffix (.xml: openvino).",
        ),
    ] = None,
    workers: WorkersOpt = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
):
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
    opts = load.load()
    m = opts.load(model)
    calib = data_mod.load(calib_data, workers) if calib_data else None
    ev = data_mod.load(data, workers) if data else None
    shape = Context(train=calib, val=ev, input_shape=opts.input_shape).shape(m)
    fmt = fmt or ("openvino" if Path(output).suffix == ".xml" else "onnx")
    res = run(
        m,
        output,
        shape,
        int8=int8,
        calib_data=calib,
        eval_data=ev,
        tol=tol,
        force=force,
        threads=threads,
        on_step=lambda text: err.print(f"{text} ..."),
        fmt=fmt,
    )
    rows = [
        ["max |onnx - torch|", f"{res['max_abs_diff']:.2e}", "", ""],
        ["FP32 ONNX Runtime", res["fp32"]["bytes"], res["fp32"]["latency_ms_batch_32"], res["fp32"].get("accuracy")],
    ]
    if int8:
        rows.append(
            [
                "INT8 ONNX Runtime (QDQ)",
                res["int8"]["bytes"],
                res["int8"]["latency_ms_batch_32"],
                res["int8"].get("accuracy"),
            ]
        )
    for kind, r in res.get("openvino", {}).items():
        if isinstance(r, dict):  # an IR is two files: its bytes are both
            rows.append(
                [
                    f"{kind.upper()} OpenVINO IR (.xml {r['xml_bytes']:,} + .bin {r['bin_bytes']:,})",
                    r["bytes"],
                    r["latency_ms_batch_32"],
                    r.get("accuracy"),
                ]
            )
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
