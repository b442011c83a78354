"""``compress pipeline``: Deep Compression end to end under an accuracy budget."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Annotated

import typer

from compress.cli.app import app
from compress.cli.common import check_reports, emit_json, err, note_no_graph, out, table, use_threads
from compress.cli.harness import TaskOptions, check_data, load_inputs
from compress.cli.options import (
    DATA,
    METHOD,
    OUTPUT,
    Coder,
    CoderOpt,
    Command,
    DistillOpt,
    ForceOpt,
    JsonOpt,
    LossOpt,
    MetricOpt,
    ModelArg,
    ModelOptions,
    OutOpt,
    ReportOpt,
    RunOptions,
    TestDataOpt,
    WorkersOpt,
    flag,
    grouped,
    option,
)

if TYPE_CHECKING:
    from compress.search_results import PipelineSummary


@app.command(cls=Command)
@grouped
def pipeline(
    model: ModelArg,
    output: OutOpt,
    load: ModelOptions,
    train_data: Annotated[
        str,
        option(
            "--train-data",
            panel=DATA,
            help="Fine-tuning data; 20% is held "
            "out to measure the accuracy budget (or the split the model "
            "was trained with).",
        ),
    ],
    max_accuracy_drop: Annotated[
        float | None,
        option(
            "--max-accuracy-drop",
            min=0.0,
            panel=METHOD,
            help="Budget in points of the --metric (accuracy points by "
            "default) on the validation data (default: the recipe's, else 0.5).",
            show_default=False,
        ),
    ] = None,
    val_data: Annotated[
        str | None,
        option(
            "--val-data",
            panel=DATA,
            help="Validation data the model was not trained on; default: 20% held out of --train-data.",
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        option("--recipe", panel=METHOD, help="TOML recipe (see docs/recipes); default: Deep Compression."),
    ] = None,
    test_data: TestDataOpt = None,
    report: ReportOpt = None,
    json_out: JsonOpt = None,
    confidence: Annotated[
        float | None,
        option(
            "--confidence",
            min=0.0,
            max=10.0,
            show_default=False,
            panel=METHOD,
            help="Standard errors of margin in the "
            "budget test (default: the recipe's, else 1: a kept drop is within budget with ~84% one-sided "
            "confidence; 2: ~98%, keeps less).",
        ),
    ] = None,
    time_budget: Annotated[
        float | None,
        option(
            "--time-budget",
            min=1,
            panel=METHOD,
            help="Seconds of search at most: then, as on Ctrl-C, the candidate in "
            "progress is dropped (checked at every training step) and the best result kept so far is written "
            "(exit status 3).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        flag(
            "--resume",
            panel=OUTPUT,
            help="Go on from where a stopped run (Ctrl-C, --time-budget, a crash) left OUTPUT.resume.",
        ),
    ] = False,
    *,
    runtime: RunOptions,
    loss: LossOpt = None,
    metric: MetricOpt = None,
    workers: WorkersOpt = None,
    distill: DistillOpt = None,
    force: ForceOpt = False,
    coder: CoderOpt = Coder.auto,
):
    """Prune, share weights and entropy-code a model into a .cpz, keeping the most compressed
    result within an accuracy budget.

    The budget is judged on validation data: a candidate is kept when its accuracy drop plus one
    standard error of that drop (from the samples where it and the input model disagree) is within
    --max-accuracy-drop. A miss by that margin alone does not stop the search; two candidates in a
    row whose measured drop exceeds the budget do.

    Exit status: 0 finished, OUTPUT written; 1 bad input or a failure; 2 bad usage; 3 stopped by Ctrl-C or
    --time-budget: the best result kept so far is written (nothing if nothing was kept yet), --resume goes on;
    4 finished but nothing kept (every candidate over budget): no OUTPUT written; 130 Ctrl-C before or after
    the search, nothing written.

    Examples:

        compress pipeline lenet5.pt --train-data mnist5k --max-accuracy-drop 0.5 -o lenet5.cpz --report out/

        compress pipeline r20.pt --train-data "mnist5k?size=32" --recipe docs/recipes/structured.toml -o r20.cpz
    """
    from pathlib import Path

    from compress import data as data_mod
    from compress.checkpoint import Checkpoint
    from compress.errors import INT8_IS_PT, OutputExistsError, UsageError
    from compress.model_io import save_model
    from compress.recipe import Recipe
    from compress.search import pipeline as run

    arch, how = load.arch, load.load()
    # compress's own files, loaded without --trust-pickle (it covers the user's model only); --arch may rebuild
    # the user's classes. A link or a folder compress did not make is refused here, before any work.
    ckpt = Checkpoint(Path(f"{output}.resume"), arch)
    found = ckpt.exists()
    if resume and not found:
        raise UsageError(f"--resume: no checkpoint {ckpt.folder} to go on from")
    if not resume and found:
        if not force:
            raise OutputExistsError(
                f"{ckpt.folder} holds an unfinished run: --resume goes on with it, --force starts over"
            )
        ckpt.clear()  # only the files its manifest lists
    check_reports(report, json_out, force or resume)  # before minutes of work, not after them
    use_threads(runtime.threads)
    rec = Recipe.load(recipe) if recipe else None
    if rec is not None and Path(output).suffix == ".cpz" and any(st.name == "int8" for st in rec.stages):
        raise UsageError(f"{output}: a recipe with an int8 stage writes an INT8 model; {INT8_IS_PT}: give -o NAME.pt")
    task = TaskOptions(loss, metric, workers)
    # a resumed run writes the output its stopped run wrote
    inp = load_inputs(model, output, force or resume, how, None, test_data, task=task)
    ds = check_data(inp.model, data_mod.load(train_data, workers), task, inp.metric, training=True)
    val = check_data(inp.model, data_mod.load(val_data, workers), task, inp.metric) if val_data else None
    if rec is not None:  # the recipe's shifts fit the images: said before minutes of work
        from compress.train import check_augment

        for cand in (c for st in rec.stages for c in st.candidates):
            check_augment(cand.finetune.augment, ds)
    original = copy.deepcopy(inp.model)
    m, summary = run(
        inp.model,
        ds,
        rec,
        max_accuracy_drop,
        inp.input_shape,
        on_event=_ShowEvents(inp.metric.label),
        val_data=val,
        test_data=inp.test,
        latency=not runtime.no_latency,
        time_budget=time_budget,
        confidence=confidence,
        loss=inp.loss,
        metric=inp.metric,
        distill=distill,
        checkpoint=ckpt,
        resume=resume,
        coder=coder.value,
    )
    m = m.cpu()
    stopped, nothing = summary.stopped, summary.kept_nothing
    if not nothing:  # else the input, re-encoded: no smaller, and often larger than the input (headers, codes)
        save_model(m, output, force=force or resume, coder=coder.value)  # the same bytes the summary counted
    if not stopped:
        ckpt.remove()
    note_no_graph(summary.graph_note)
    from compress.report.render import score_change, score_text, value_text

    test = inp.test is not None
    label = inp.metric.label
    rows = [
        [
            t["stage"],
            t["bytes"],
            f"{summary.dense_bytes / t['bytes']:.1f}x",
            t["nonzeros"],
            t["macs"],
            t.get("latency_ms"),
            t["accuracy"],
        ]
        + ([t["test_accuracy"]] if test else [])
        for t in summary.timeline
    ]
    out.print(
        table(
            f"pipeline -> {output}",
            ["stage", "bytes", "ratio", "nonzeros", "MACs", "median ms (batch 1)", f"validation {label}"]
            + ([f"test {label}"] if test else []),
            rows,
        )
    )
    for k, s in enumerate(summary.stages):
        cut = stopped and k == len(summary.stages) - 1  # the stage the stop ended
        what = value_text(s.kept.value) if s.kept else "nothing (stopped)" if cut else "nothing (all over budget)"
        key = "" if s.kept and "," in s.search_key else f"{s.search_key} "  # several keys: the value names each
        out.print(f"{s.stage}: kept {key}{what} after {len(s.tried)} candidate(s), {s.seconds:.0f}s")
    line = (
        f"[bold]nothing kept[/bold]: the model is unchanged, validation {score_text(summary.base_accuracy, label)}"
        if nothing
        else f"[bold]{summary.ratio:.1f}x smaller[/bold] than dense FP32 ({summary.cpz_bytes:,} bytes), "
        f"validation {score_change(summary.base_accuracy, summary.final_accuracy, label)}"
    )
    line += (
        f" (budget {summary.budget_pt:g} pt at {_one_sided(summary.confidence):.0%} one-sided confidence "
        f"on {summary.validation['samples']:,} validation samples)"
    )
    if summary.test_accuracy_before is not None and summary.test_accuracy_after is not None:
        line += f"; test {score_change(summary.test_accuracy_before, summary.test_accuracy_after, label)}"
    out.print(line)
    if summary.candidate_bytes_error and not nothing:  # the bytes above: each candidate's .cpz, when tried
        out.print(
            f"the file written is {summary.cpz_bytes:,} bytes, {summary.candidate_bytes_error:+,} beside the "
            "last candidate kept: the pipeline's history entry, written only now"
        )
    if stopped:
        what = "nothing was kept yet, so no OUTPUT is written" if nothing else "the best result kept before it"
        then = (
            f"--resume goes on from {ckpt.folder}" if ckpt.exists() else "no candidate was decided: nothing to resume"
        )
        out.print(f"stopped early ({_STOPPED_BY[stopped]}): {what}; the stages after it did not run. {then}")
    if report:
        from compress.report.render import render_pipeline_report

        paths = render_pipeline_report(summary, original, m, tuple(summary.input_shape), report, force=force)
        err.print(f"report written to {paths['html']}")
    if json_out:
        emit_json(summary.to_dict(), json_out, force)
    if nothing and not stopped:
        err.print(_nothing_kept(summary, model, train_data, output), markup=False)
    elif not nothing:
        err.print(f"wrote {output}")
    if stopped:
        raise typer.Exit(EXIT_STOPPED)
    if nothing:
        raise typer.Exit(EXIT_NOTHING_KEPT)


EXIT_STOPPED = 3  # Ctrl-C or --time-budget: the best result kept so far is written; --resume goes on
EXIT_NOTHING_KEPT = 4  # finished, but no candidate of any stage was within budget: nothing written
_STOPPED_BY = {"interrupted": "Ctrl-C", "time budget": "--time-budget reached"}


def _nothing_kept(summary: PipelineSummary, model: str, train_data: str, output: str) -> str:
    """What a run that kept nothing says: why no file was written, and what to try."""
    tried = sum(len(s.tried) for s in summary.stages)
    best = min((t.drop for s in summary.stages for t in s.tried), default=None)
    closest = f" (the smallest drop measured was {best:.2f} pt)" if best is not None else ""
    return (
        f"nothing kept: all {tried} candidate(s) were over the {summary.budget_pt:g} pt budget{closest}, "
        f"so {output} was not written: it would hold the input model unchanged, re-encoded "
        f"({summary.cpz_bytes:,} bytes against {summary.dense_bytes:,} dense). To try:\n"
        f"  - see how much each layer takes: compress prune {model} --method l1-filter --sensitivity "
        f"--train-data {train_data} -o sens.pt\n"
        f"  - a larger --max-accuracy-drop, if the task allows it\n"
        "  - a gentler recipe: its first candidates prune less (docs/recipes/gentle.toml starts at sparsity "
        "0.5), as small models need"
    )


def _one_sided(z: float) -> float:
    """The normal probability that the true drop is below the measured drop + z standard errors."""
    import math

    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds >= 60 else f"{seconds:.0f}s"


class _ShowEvents:
    """The pipeline's progress on stderr: each candidate with its verdict, the stage's elapsed time and
    an estimate of what is left of it (the pipeline's: the pace so far, never past the time budget)."""

    def __init__(self, label: str = "accuracy %"):
        self.label = label  # the metric's: every score is named by it

    def __call__(self, kind: str, kw: dict) -> None:
        from compress.report.render import score_text, value_text

        if kind == "start":
            within = f", time budget {_clock(kw['time_budget'])}" if kw.get("time_budget") is not None else ""
            err.print(
                f"validation {score_text(kw['accuracy'], self.label)}, budget {kw['budget']} pt{within}, dense "
                f"{kw['bytes']:,} bytes (Ctrl-C stops and writes the best result kept so far)"
            )
        elif kind == "candidate":
            eta = ""
            if kw["eta"] is not None:
                capped = kw["budget_left"] is not None and kw["eta"] >= kw["budget_left"]
                eta = f", ~{_clock(kw['eta'])} left at most" + (" (time budget)" if capped else "")
            err.print(
                f"  {kw['stage']} {kw['index']}/{kw['of']} {value_text(kw['value'])}: "
                f"{score_text(kw['accuracy'], self.label)}, {kw['bytes']:,} bytes; {kw['verdict']} "
                f"[{_clock(kw['elapsed'])}{eta}]"
            )
        elif kind == "warning":
            err.print(f"warning: {kw['text']}")
        elif kind == "skipped":
            err.print(f"  {kw['stage']}: no candidate within budget; stage skipped")
        elif kind == "resumed":
            err.print(f"resuming at stage {kw['stage'] + 1}, candidate {kw['candidates'] + 1}")
        elif kind == "stopped":
            err.print(
                f"  stopped during {kw['stage']} ({_STOPPED_BY[kw['reason']]}): the candidate in progress is dropped"
            )
