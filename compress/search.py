"""The pipeline (``compress.pipeline``): Deep Compression end to end, under an accuracy budget (this module is
``compress.search``, so that ``compress.pipeline`` is the function whatever was imported).

A recipe (``compress.recipe``) is a list of stages. A stage whose search key is a list is a
*search*: its candidates are tried in order of increasing compression and the most compressed one
within the budget is kept (threshold pruning goes on from the previous candidate, as Han et al.'s
iterative pruning does; other stages start each candidate from the stage's input).

The budget rule. The budget is measured on validation data -- the user's, or a split held out
from the training data, never test data. A candidate is *within budget* when its accuracy drop
against the input model, on the same samples, plus ``confidence`` (default 1) standard errors of
that paired difference stays within the budget. The standard error comes from the samples on
which the two models disagree (McNemar), so the margin shrinks as the evidence grows: a candidate
that agrees with the input on nearly every sample is judged almost exactly, one that flips many
predictions needs a clear lead. Taking the most compressed candidate whose noisy drop happens to
look small would overshoot the budget on new data (the winner's curse); the margin guards
against that. A candidate that misses only by its margin (measured drop within budget) is
*inconclusive*: the search goes on past it. The search ends after ``patience`` candidates in a
row whose measured drop alone exceeds the budget.

The result is Huffman-coded into a .cpz, and the bytes after each stage are recorded.

Stopping. Ctrl-C or the time budget ends the run with the best result kept so far; the candidate in progress is
dropped. The time budget is checked between candidates and at every step of a candidate's work (each training
step: ``progress.stop_when``), on ``clock`` -- ``time.perf_counter``, a module attribute that tests replace.
``summary.kept_nothing`` says when no stage kept a candidate: the model is the input, unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from compress import data as data_mod
from compress import kinds, progress
from compress.checkpoint import Checkpoint, StagePlan, Stop, ctrl_c
from compress.checkpoint import fingerprint as run_fingerprint
from compress.config import Config
from compress.counting import count_params, counts
from compress.cpz.stats import size_bytes
from compress.measure import latency_stats
from compress.meta import read_meta, set_meta
from compress.method import Context, run
from compress.recipe import DEFAULT_RECIPE, Recipe, Stage, resolve
from compress.scoring import Judge, Scores, errors_allowed, samples_for
from compress.search_results import PipelineSummary, StageSearch

log = logging.getLogger(__name__)
clock = time.perf_counter  # the time budget's clock (tests give a fake one)


@dataclasses.dataclass
class _SearchState:
    """Where a stage's search stands: the next candidate, the misses in a row, every record so far, and the
    kept candidate (its index, sizes, model) and the model the next iterative candidate builds on."""

    next: int = 0
    misses: int = 0
    tried: list = dataclasses.field(default_factory=list)
    kept_index: int | None = None
    kept_sizes: dict | None = None
    kept_model: nn.Module | None = None
    current: nn.Module | None = None


def _search(
    stage: Stage,
    model: nn.Module,
    ctx: Context,
    judge: Judge,
    emit,
    stop: Stop,
    state: _SearchState | None = None,
    save: Callable | None = None,
    coder: str = "auto",
):
    """Try a stage's candidates: (the most compressed one within budget or None, its sizes as measured
    when it was tried, the record of all). Ctrl-C or the time budget ends it with what was kept, the candidate in
    progress dropped. ``state``: where a checkpoint left it; ``save(state)`` after each decided candidate.

    Each candidate's event carries ``elapsed`` (seconds of this search so far) and ``eta``: the seconds the
    candidates left would take at the pace so far, never more than the time budget has left (None: none left)."""
    st = state or _SearchState(current=model)
    t0, done = clock(), 0
    for j in range(st.next, len(stage.candidates)):
        cfg = stage.candidates[j]
        if stop.check():
            break
        start = st.current if stage.iterative and st.current is not None else model
        try:
            stop.in_candidate = True
            with progress.stop_when(stop.check):  # the time budget ends the candidate's work at its next step
                cand = run(cfg.verb, copy.deepcopy(start), cfg, ctx).model
                sizes = size_bytes(cand, graph=True, coder=coder)  # as the file is written: its graph too
                rec = {"value": stage.value(cfg), "options": cfg.to_dict(), **judge(cand), "bytes": sizes["coded"]}
        except (
            KeyboardInterrupt
        ):  # Ctrl-C or the time budget: the candidate in progress is dropped; what was kept stands
            stop.reason = stop.reason or "interrupted"
            break
        finally:
            stop.in_candidate = False
        st.tried.append(rec)
        over = rec.pop("over")
        st.next = j + 1
        if not rec["within_budget"]:
            st.misses += over  # an inconclusive reading is noise: it neither ends nor resets the run
            if stage.iterative:
                # sparser candidates build on this one, with more fine-tuning; `patience` readings in
                # a row whose measured drop alone is over budget end the search
                if st.misses >= stage.patience:
                    st.next = len(stage.candidates)
                else:
                    st.current = cand
        else:
            st.misses = 0
            if st.kept_index is None or rec["bytes"] <= st.tried[st.kept_index]["bytes"]:
                st.kept_index, st.kept_sizes, st.kept_model = len(st.tried) - 1, sizes, cand
            st.current = cand
            if cfg.first_fit:  # the later candidates only cost more
                st.next = len(stage.candidates)
        if save is not None:
            try:
                save(st)
            except KeyboardInterrupt:  # the files on disk name the state before this one: still a valid checkpoint
                stop.reason = stop.reason or "interrupted"
                break
        done += 1
        elapsed = clock() - t0
        left, budget_left = len(stage.candidates) - st.next, stop.left()
        eta = (
            None
            if not left
            else elapsed / done * left
            if budget_left is None
            else min(elapsed / done * left, budget_left)
        )
        emit(
            "candidate",
            stage=stage.name,
            index=j + 1,
            of=len(stage.candidates),
            **rec,
            over=over,
            elapsed=elapsed,
            eta=eta,
            budget_left=budget_left,
        )  # once saved
        if st.next >= len(stage.candidates):
            break
    kept = None if st.kept_index is None else st.tried[st.kept_index]
    for rec in st.tried:  # the final word on each: every one within budget but not kept is at least as large
        why = rec.pop("why")
        if rec is kept:
            rec["verdict"] = f"kept: {why}"
        elif rec["within_budget"]:
            rec["verdict"] = f"within budget, but not smaller than the kept one: {why}"
    return (
        st.kept_model,
        st.kept_sizes,
        {"stage": stage.name, "search_key": stage.search_key, "kept": kept, "tried": st.tried},
    )


def _errors_allowed(judge: Judge, budget: float, z: float) -> tuple[int, int, int | None] | None:
    """For a 0/100 metric scored per sample (top-1, top-5): (samples, the most samples a candidate may get wrong
    that the input gets right and stay within budget, the samples that would allow 3); None for other metrics."""
    ref = judge.ref
    if not isinstance(ref, Scores) or ref.weights is not None:
        return None
    if not bool(((ref.values == 0) | (ref.values == 100)).all()):
        return None
    n = len(ref.values)
    return n, errors_allowed(n, budget, z), samples_for(3, budget, z)


def _label(stage: Stage, kept: bool) -> str:
    """The timeline's name for the model after ``stage``."""
    if not kept:  # the row shows the model as it stands, not a result of this stage
        return f"{stage.name}: nothing kept"
    if stage.name == "int8":
        return "int8"
    if stage.candidates[0].verb == "quantize":
        return "quantized"
    return "pruned" if stage.name == "threshold" else stage.name


def _plan(recipe: Recipe) -> list[StagePlan]:
    """What a checkpoint of a run of ``recipe`` must agree with, stage by stage (``checkpoint.check_state``)."""
    import json

    def as_read(v):  # as the checkpoint's JSON gives it back
        return json.loads(json.dumps(v))

    return [
        StagePlan(
            s.name,
            s.search_key,
            tuple((as_read(s.value(c)), as_read(c.to_dict())) for c in s.candidates),
            (_label(s, True), _label(s, False)),
        )
        for s in recipe.stages
    ]


def _point(label: str, model: nn.Module, nbytes: int, accuracy: float, ctx: Context, test=None) -> dict:
    """The numbers of the model after one stage: bytes, nonzeros, MACs, score (latency: at the end)."""
    c = counts(model, ctx.input_shape)  # INT8 kernels: the architecture's counts, its INT8 weights' nonzeros
    p = {
        "stage": label,
        "bytes": nbytes,
        "accuracy": round(accuracy, 3),
        "params": c["params"],
        "nonzeros": c["nonzeros"],
        "macs": c["macs"],
    }
    if kinds.execution(model) is not None:
        p["int8"] = True
    if test is not None:
        p["test_accuracy"] = round(ctx.score(model, test), 3)
    return p


def pipeline(
    model: nn.Module,
    data,
    recipe: Recipe | dict | None = None,
    max_accuracy_drop: float | None = None,
    input_shape=None,
    on_event: Callable | None = None,
    val_data=None,
    test_data=None,
    val_fraction: float | None = None,
    latency: bool = True,
    time_budget: float | None = None,
    confidence: float | None = None,
    *,
    loss=None,
    metric=None,
    train_step=None,
    evaluate=None,
    distill: float | None = None,
    workers: int | None = None,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    coder: str = "auto",
) -> tuple[nn.Module, PipelineSummary]:
    """Run a recipe on ``model`` (in place); returns (model, summary). ``data``: training data -- a spec or
    anything ``compress.data.as_data`` takes; ``val_data`` and ``test_data`` likewise. ``loss``, ``metric``,
    ``train_step``, ``evaluate``: the user's recipe (``compress.method.Context``); the budget is in the metric's
    points. ``distill``: every stage's fine-tuning also learns from the input model at this temperature (a recipe's
    ``finetune.distill`` does so for its stage; the teacher is always the input model, the one the budget judges
    against).
    ``checkpoint``: written after each decided candidate (and removed at the end); with ``resume`` the run goes on
    from it, to the result an uninterrupted run reaches. ``coder``: how the .cpz bytes are counted (and the file
    is to be written: ``save_model(..., coder=)``): ``auto``, ``huffman`` or ``context`` (``encode_model``).
    ``on_event(kind, fields)`` hears "start", "resumed", "warning", "stage", "candidate" (once checkpointed), "skipped"
    and "stopped", as
    stages' events. ``time_budget`` (seconds) or Ctrl-C ends the search early, the candidate in progress dropped
    (the budget is checked at every training step): the result is the best kept so far (``summary.stopped``
    says why), encoded and measured as usual. ``summary.kept_nothing``: no stage kept a candidate, so the
    model is the input's (re-encoded, it may be larger than the input).

    Precedence of every setting: argument > recipe > model metadata > default.
    """
    recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else recipe or DEFAULT_RECIPE

    def as_data(d, name, arg):
        return data_mod.load(d, workers) if isinstance(d, str) else data_mod.as_data(d, name, workers or 0, arg=arg)

    ds = as_data(data, "training data", "data")
    budget = resolve(max_accuracy_drop, recipe.max_accuracy_drop, default=0.5)
    z = resolve(confidence, recipe.confidence, default=1.0)
    if val_data is not None:
        train, val = ds, as_data(val_data, "validation data", "val_data")
    else:
        vf = resolve(val_fraction, recipe.val_fraction, read_meta(model).val_fraction, default=data_mod.VAL_FRACTION)
        train, val = data_mod.split(ds, float(vf), seed=0)
    if test_data is not None:
        test_data = as_data(test_data, "test data", "test_data")
    if distill:
        recipe = recipe.with_finetune(distill=distill)
    # the teacher of every stage that distils is the model the budget judges against (the input), not the stage's
    # input: an iterative candidate learning from the last one would drift from the input a step at a time
    distils = any(c.finetune.distill and c.finetune.distill_weight > 0 for st in recipe.stages for c in st.candidates)
    ctx = Context(
        train=train,
        val=val,
        input_shape=input_shape,
        loss=loss,
        metric=metric,
        train_step=train_step,
        evaluate=evaluate,
        teacher=copy.deepcopy(model) if distils else None,
    )
    ctx.input_shape = ctx.shape(model)
    fingerprint, saved, saved_models = "", dict[str, Any](), dict[str, nn.Module]()
    if checkpoint is not None:  # a checkpoint that will not do is refused before any work (or output)
        fingerprint = run_fingerprint(model, recipe, budget, z, train, val)
        if resume:  # checked against this run's recipe; its models loaded without trust
            saved, saved_models = checkpoint.read(fingerprint, _plan(recipe), test=test_data is not None)
        else:
            checkpoint.check()
    emit = Context(on_event=on_event).emit  # the pipeline's own events: on_event(kind, fields), as a stage's
    judge = Judge(ctx.val, budget, z, ctx.metric, ctx.evaluate)
    ctx.judge = judge  # a stage that meets the budget itself (the int8 stage's float fallback) meets this one
    # (in place, as at the end): every candidate then carries the input shape its file will, so its .cpz bytes,
    # graph included, are those the file takes
    set_meta(model, input_shape=list(ctx.input_shape))
    base_acc = judge.start(model)
    dense = 4 * count_params(model)
    timeline = [_point("dense fp32", model, dense, base_acc, ctx, test_data)]
    snapshots = [copy.deepcopy(model)]  # the model after each stage, timed together at the end
    emit("start", accuracy=base_acc, bytes=dense, budget=budget, time_budget=time_budget)
    if val_data is None and base_acc >= 99.8:
        text = (
            f"the held-out split of the training data reads {base_acc:.2f}%: the model has most likely been "
            "trained on it, so every candidate's drop looks real and little is kept. Give --val-data "
            "(val_data=) with samples the model has not seen"
        )
        if on_event is None:  # a listener shows it; the log is for callers without one (said once)
            log.warning(text)
        emit("warning", text=text)
    allowed = _errors_allowed(judge, budget, z)
    if allowed is not None and allowed[1] <= 1:
        n, k, more = allowed
        text = (
            f"{n:,} validation samples are few for a {budget:g} pt budget at {z:g} SE: a candidate may get at most "
            f"{k} sample(s) wrong that the input gets right, so nearly every change is refused"
            + (f" ({more:,} samples would allow 3)" if more is not None else "")
            + ". Give more --val-data (val_data=) or a larger --max-accuracy-drop"
        )
        if on_event is None:
            log.warning(text)
        emit("warning", text=text)
    history_before = len(read_meta(model).history)
    results, measured = [], None  # measured: (sizes, val accuracy) of `model`, taken when it was a candidate
    stop = Stop(None if time_budget is None else clock() + time_budget, clock=clock)
    first, search_state = 0, None
    if checkpoint is not None and resume:
        first, results, timeline = saved["stage"], saved["results"], saved["timeline"]
        measured = None if saved["measured"] is None else tuple(saved["measured"])
        model = saved_models["model"]
        snapshots = [saved_models[f"snapshot{k}"] for k in range(len(timeline))]
        if saved["search"] is not None:
            search_state = _SearchState(
                **{
                    **saved["search"],
                    "kept_model": saved_models.get("kept"),
                    "current": saved_models.get("current", model),
                }
            )
        emit("resumed", stage=first, candidates=0 if search_state is None else search_state.next)

    def save(stage_index: int, st: _SearchState | None) -> None:
        search = (
            None if st is None else {k: getattr(st, k) for k in ("next", "misses", "tried", "kept_index", "kept_sizes")}
        )
        models: dict[str, nn.Module | None] = {"model": model, **{f"snapshot{k}": m for k, m in enumerate(snapshots)}}
        if st is not None:
            models.update(kept=st.kept_model, current=st.current if st.current is not model else None)
        if checkpoint is None:
            return
        checkpoint.write(
            {
                "fingerprint": fingerprint,
                "stage": stage_index,
                "results": results,
                "timeline": timeline,
                "measured": measured,
                "search": search,
            },
            models,
        )

    with ctrl_c(stop):  # Ctrl-C interrupts a candidate's training, never the bookkeeping around it
        for i, stage in enumerate(recipe.stages):
            if i < first:
                continue
            if stop.check():
                break
            t0 = clock()
            emit("stage", stage=stage.name, candidates=len(stage.candidates))
            kept_model, kept_sizes, res = _search(
                stage,
                model,
                ctx,
                judge,
                emit,
                stop,
                state=search_state if i == first else None,
                save=None if checkpoint is None else (lambda st, i=i: save(i, st)),
                coder=coder,
            )
            if stop.reason:
                emit("stopped", reason=stop.reason, stage=stage.name)
            if kept_model is None:
                if not stop.reason:  # stopped: nothing was judged, so nothing was skipped
                    emit("skipped", stage=stage.name)
                    if on_event is None:
                        log.warning("stage %s: no candidate within %.2f pt; stage skipped", stage.name, budget)
            else:
                model, measured = kept_model, (kept_sizes, res["kept"]["accuracy"])  # as measured when tried
            if measured is None:  # nothing kept yet: the input model, measured once
                measured = (size_bytes(model, graph=True, coder=coder), base_acc)
            sizes, acc = measured
            res.update(bytes=sizes["coded"], accuracy=round(acc, 3), seconds=round(clock() - t0, 2))
            quantized = stage.candidates[0].verb == "quantize"
            timeline.append(
                _point(
                    _label(stage, kept_model is not None),
                    model,
                    sizes["fixed"] if quantized else sizes["coded"],
                    acc,
                    ctx,
                    test_data,
                )
            )
            snapshots.append(copy.deepcopy(model))
            results.append(res)
            if checkpoint is not None and not stop.reason:
                save(i + 1, None)
    # batch-1 latency of every stage's model, interleaved after a warm-up: the same machine state for all
    for point, st in zip(
        timeline, latency_stats(snapshots, ctx.input_shape, batch=1, runs=15) if latency else [], strict=False
    ):
        point["latency_ms"] = st["ms"]
    # one entry for the whole pipeline: what each kept stage did (not every candidate it went through)
    set_meta(
        model,
        history=list(read_meta(model).history)[:history_before]
        + [
            {
                "stage": "pipeline",
                "budget_pt": budget,
                "kept": [
                    {"stage": r["stage"], "config": Config.from_dict(r["kept"]["options"]).changes()}
                    if r["kept"]
                    else None
                    for r in results
                ],
            }
        ],
    )
    set_meta(model, input_shape=list(ctx.input_shape))
    final = size_bytes(model, graph=True, coder=coder)  # with the history above: exactly the bytes save_model writes
    last = "INT8 file" if kinds.execution(model) is not None else "huffman coded"  # same weights, as saved
    timeline.append({**timeline[-1], "stage": last, "bytes": final["coded"]})
    kept = [r["kept"]["bytes"] for r in results if r["kept"]]
    summary = PipelineSummary(
        stopped=stop.reason,
        kept_nothing=not kept,
        budget_pt=budget,
        confidence=z,
        base_accuracy=round(base_acc, 3),
        final_accuracy=round(timeline[-1]["accuracy"], 3),
        dense_bytes=dense,
        cpz_bytes=final["coded"],
        ratio=round(dense / final["coded"], 2),
        timeline=timeline,
        layer_bytes=final["layers"],
        graph_note=final["graph_note"],
        stages=[StageSearch.from_record(r) for r in results],
        input_shape=list(ctx.input_shape),
        recipe=recipe.to_dict(),
        validation={
            "samples": len(val),
            "source": "given" if val_data is not None else "held out",
            "data": val.name,
            **({"errors_allowed": allowed[1]} if allowed is not None else {}),
        },
        metric="evaluate" if evaluate is not None else ctx.metric.name,
        # a candidate's bytes are its own .cpz; the file's history entry is written only now
        candidate_bytes_error=final["coded"] - kept[-1] if kept else None,
    )
    if test_data is not None:
        summary.test_accuracy_before = timeline[0]["test_accuracy"]
        summary.test_accuracy_after = timeline[-1]["test_accuracy"]
    return model, summary
