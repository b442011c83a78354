"""``compress report``: the numbers of one model file."""

from __future__ import annotations

from compress.cli.app import app
from compress.cli.common import check_reports, emit_json, out, table, use_threads
from compress.cli.options import (
    Command,
    DataOpt,
    ForceOpt,
    JsonOpt,
    MetricOpt,
    ModelArg,
    ModelOptions,
    ReportOpt,
    RunOptions,
    TestDataOpt,
    WorkersOpt,
    grouped,
)


@app.command(cls=Command)
@grouped
def report(
    model: ModelArg,
    load: ModelOptions,
    runtime: RunOptions,
    data: DataOpt = None,
    test_data: TestDataOpt = None,
    metric: MetricOpt = None,
    workers: WorkersOpt = None,
    json_out: JsonOpt = None,
    report_dir: ReportOpt = None,
    force: ForceOpt = False,
):
    """Size, nonzeros, MACs, latency and accuracy of a model (.pt, TorchScript, .cpz or .onnx).

    Examples:

        compress report lenet5.pt --data mnist5k

        compress report weights.pt --arch zoo:lenet5 --input-shape 1,1,28,28 --json report.json
    """
    from compress.report import model_report

    check_reports(report_dir, json_out, force)
    use_threads(runtime.threads)
    rep = model_report(
        model,
        load.load(),
        data=data,
        latency=not runtime.no_latency,
        test_data=test_data,
        metric=metric,
        workers=workers,
    )
    if json_out == "-":
        emit_json(rep, "-")
        return
    show_report(rep)
    emit_json(rep, json_out, force)
    if report_dir:
        from compress.report.render import render_model_report

        paths = render_model_report(rep, report_dir, force=force)
        out.print(f"report written to {paths['html']}")


def show_report(rep: dict) -> None:
    from compress.report.render import graph_layer_rows, model_rows

    out.print(table(rep["file"], ["", "value"], model_rows(rep)))
    if rep.get("layers") and "nodes" in rep["layers"][0]:  # decoded from its stored graph: groups of its nodes
        out.print(table(*graph_layer_rows(rep["layers"])))
    elif rep.get("layers"):
        out.print(
            table(
                "layers",
                ["layer", "type", "params", "nonzeros", "MACs", "output"],
                [
                    [r["name"], r["type"], r["params"], r["nonzeros"], r["macs"], "x".join(map(str, r["output_shape"]))]
                    for r in rep["layers"]
                ],
            )
        )
