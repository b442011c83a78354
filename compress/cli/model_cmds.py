"""``compress report``: the numbers of one model file."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import app
from .common import (ArchOpt, DataOpt, ForceOpt, InputShapeOpt, JsonOpt, ModelArg, TestDataOpt, TrustOpt,
                     emit_json, out, parse_shape, table)


@app.command()
def report(model: ModelArg, arch: ArchOpt = None, trust_pickle: TrustOpt = False, data: DataOpt = None,
           test_data: TestDataOpt = None, input_shape: InputShapeOpt = None, json_out: JsonOpt = None,
           no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip latency timing.")] = False,
           html: Annotated[Optional[str], typer.Option("--html", help="Also write an HTML/Markdown report "
                                                       "with plots to this folder.")] = None,
           force: ForceOpt = False):
    """Size, nonzeros, MACs, latency and accuracy of a model (.pt, TorchScript, .cpz or .onnx).

    Examples:

        compress report lenet5.pt --data mnist5k

        compress report weights.pt --arch zoo:lenet5 --input-shape 1,1,28,28 --json report.json
    """
    from ..report import model_report

    rep = model_report(model, arch=arch, trust_pickle=trust_pickle, data=data, input_shape=parse_shape(input_shape),
                       latency=not no_latency, test_data=test_data)
    if json_out == "-":
        emit_json(rep, "-")
        return
    show_report(rep)
    emit_json(rep, json_out, force)
    if html:
        from ..report.render import render_model_report

        paths = render_model_report(rep, html, force=force)
        out.print(f"report written to {paths['html']}")


def show_report(rep: dict) -> None:
    rows = [["file", rep["file"]], ["file bytes", rep["file_bytes"]], ["params", rep.get("params")],
            ["nonzero params", rep.get("nonzero_params")], ["dense fp32 bytes", rep.get("dense_fp32_bytes")],
            ["ratio vs dense fp32", f"{rep['ratio_vs_dense_fp32']:.2f}x" if rep.get("ratio_vs_dense_fp32") else None],
            ["MACs", rep.get("macs")], ["input shape", "x".join(map(str, rep.get("input_shape", [])))]]
    if "accuracy" in rep:
        rows.append(["accuracy %", rep["accuracy"]])
    if "test_accuracy" in rep:
        rows.append(["test accuracy %", rep["test_accuracy"]])
    for k, v in rep.get("latency_ms", {}).items():
        rows.append([f"latency {k.replace('_', ' ')} ms", v])
    out.print(table("model", ["", "value"], rows))
    if rep.get("layers"):
        out.print(table("layers", ["layer", "type", "params", "nonzeros", "MACs", "output"],
                        [[r["name"], r["type"], r["params"], r["nonzeros"], r["macs"],
                          "x".join(map(str, r["output_shape"]))] for r in rep["layers"]]))
