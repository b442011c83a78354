"""``compress pipeline``: Deep Compression end to end under an accuracy budget."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import app
from .common import (ArchOpt, ForceOpt, InputShapeOpt, JsonOpt, ModelArg, OutOpt, ReportOpt, TestDataOpt,
                     TrustOpt, emit_json, err, out, table)
from .stage import check_output


@app.command()
def pipeline(model: ModelArg, output: OutOpt,
             train_data: Annotated[str, typer.Option("--train-data", help="Fine-tuning data; 10% is held "
                                                     "out to measure the accuracy budget.")],
             max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="Budget in accuracy "
                                                              "points on the held-out split.")] = 0.5,
             recipe: Annotated[Optional[str], typer.Option("--recipe", help="TOML recipe (see docs/recipes); "
                                                           "default: Deep Compression.")] = None,
             arch: ArchOpt = None, trust_pickle: TrustOpt = False, test_data: TestDataOpt = None,
             input_shape: InputShapeOpt = None, report: ReportOpt = None, json_out: JsonOpt = None,
             force: ForceOpt = False):
    """Prune, share weights and Huffman-code a model into a .cpz, keeping the most compressed
    result within an accuracy budget.

    Examples:

        compress pipeline lenet5.pt --train-data mnist5k --max-accuracy-drop 0.5 -o lenet5.cpz --report out/

        compress pipeline r20.pt --train-data "mnist5k?size=32" --recipe docs/recipes/structured.toml -o r20.cpz
    """
    import copy

    from .. import data as data_mod
    from ..coding.container import save_cpz
    from ..io import load_model
    from ..metrics import input_shape_of
    from ..pipeline import load_recipe, pipeline as run
    from ..train import evaluate

    check_output(model, output, force)
    rec = load_recipe(recipe) if recipe else None
    m = load_model(model, arch=arch, trust_pickle=trust_pickle)
    ds = data_mod.load(train_data)
    data_mod.check_fits(m, ds)
    test = data_mod.load(test_data) if test_data else None
    shape = input_shape_of(m, ds, input_shape)
    original = copy.deepcopy(m)

    def on_event(kind, **kw):
        if kind == "start":
            err.print(f"validation accuracy {kw['accuracy']:.2f}%, budget {kw['budget']} pt, "
                      f"dense {kw['bytes']:,} bytes")
        elif kind == "candidate":
            mark = "ok" if kw["within_budget"] else "over budget"
            opts = {k: v for k, v in kw["options"].items() if k in ("sparsity", "bits", "ratio", "energy", "lasso_ratio")}
            err.print(f"  {kw['stage']} {kw['index']}/{kw['of']} {opts}: accuracy {kw['accuracy']:.2f}% "
                      f"({-kw['drop']:+.2f} ± {kw['se']:.2f} pt), {kw['bytes']:,} bytes ({mark})")
        elif kind == "skipped":
            err.print(f"  {kw['stage']}: no candidate within budget; stage skipped")

    from ..io import get_meta
    from ..pipeline import DEFAULT_RECIPE

    rec = dict(rec or DEFAULT_RECIPE)
    trained_vf = get_meta(m).get("val_fraction")
    if trained_vf and "val_fraction" not in (rec if recipe else {}):
        rec["val_fraction"] = trained_vf  # hold out exactly what the model was not trained on
    m, summary = run(m, ds, rec, max_accuracy_drop, shape, on_event=on_event)
    stats = save_cpz(m, output, force=force)
    summary["cpz_bytes"] = stats["file_bytes"]
    summary["ratio"] = round(summary["dense_bytes"] / stats["file_bytes"], 2)
    if test is not None:
        summary["test_accuracy_before"] = round(evaluate(original, test), 3)
        summary["test_accuracy_after"] = round(evaluate(m, test), 3)
    rows = [[t["stage"], t["bytes"], f"{summary['dense_bytes'] / t['bytes']:.1f}x", t["nonzeros"], t["accuracy"]]
            for t in summary["timeline"]]
    out.print(table(f"pipeline -> {output} (accuracy on the held-out split)",
                    ["stage", "bytes", "ratio", "nonzeros", "accuracy %"], rows))
    for s in summary["stages"]:
        kept = s["kept"]
        what = "nothing (skipped)" if not kept else {k: v for k, v in kept["options"].items()
                                                     if k in ("sparsity", "bits", "ratio", "energy", "lasso_ratio")}
        out.print(f"{s['stage']}: kept {what} after {len(s['tried'])} candidate(s), {s['seconds']:.0f}s")
    line = f"[bold]{summary['ratio']:.1f}x smaller[/bold] than dense FP32 ({stats['file_bytes']:,} bytes), " \
           f"validation accuracy {summary['base_accuracy']:.2f}% -> {summary['final_accuracy']:.2f}%"
    if test is not None:
        line += f"; test {summary['test_accuracy_before']:.2f}% -> {summary['test_accuracy_after']:.2f}%"
    out.print(line)
    if report:
        from ..report.render import render_pipeline_report

        paths = render_pipeline_report(summary, original, m, shape, report, force=force)
        err.print(f"report written to {paths['html']}")
    err.print(f"wrote {output}")
    if json_out:
        emit_json(summary, json_out, force)
