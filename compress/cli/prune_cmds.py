"""``compress prune``: every registered pruning method (threshold, l1-filter, channel-union), its options made
from its config (``config_options``); the few options of the command itself are declared here."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Literal

import typer

from compress.cli.app import app
from compress.cli.common import err, out, table
from compress.cli.config_options import ConfigOptions, Field, methods_of
from compress.cli.harness import command_inputs, run_command
from compress.cli.options import (
    METHOD,
    DataOptions,
    LazyCommand,
    ModelArg,
    ModelOptions,
    OutputOptions,
    RunOptions,
    SetOpt,
    flag,
    lazy,
    option,
)


def _target(v: float | None):
    """2e6 -> 2000000 (a count); 0.5 stays a fraction."""
    return int(v) if v is not None and v >= 1 and v == int(v) else v


# How prune spells some config fields; every other field is an option as its config declares it.
FIELDS = {
    "sparsity": Field(note="Default 0.9 unless --quality is given."),
    "round_to": Field(kw={"min": 1}),
    "target_macs": Field(parse=_target),
    "target_params": Field(parse=_target),
}
DEFAULT_METHOD = "threshold"
HIDDEN = {"first_last_factor", "min_channels", "zero_tol", "rel_tol"}  # left to --set and recipes


@functools.cache
def spec() -> ConfigOptions:
    import compress.prune  # noqa: F401  (registers the pruning methods)

    methods = methods_of("prune")
    return ConfigOptions({DEFAULT_METHOD: methods[DEFAULT_METHOD], **methods}, FIELDS, HIDDEN)


def _options() -> list[inspect.Parameter]:
    s = spec()
    names = tuple(s.methods)

    def kw(name, annotation, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    return [
        kw(
            "method",
            Annotated[Literal.__getitem__(names), option("--method", "-m", panel=METHOD, help="Pruning method.")],
            names[0],
        ),
        *s.params(),
        kw(
            "sensitivity",
            Annotated[
                bool,
                flag(
                    "--sensitivity",
                    panel=METHOD,
                    help="l1-filter: prune each layer "
                    "alone at several ratios first, and show accuracy per layer and "
                    "ratio.",
                ),
            ],
            False,
        ),
        kw(
            "budget",
            Annotated[
                float | None,
                option(
                    "--budget",
                    panel=METHOD,
                    help="l1-filter with --sensitivity: per-layer ratios from this accuracy drop (pt).",
                ),
            ],
            None,
        ),
    ]


@app.command(cls=LazyCommand)
@lazy(_options)
def prune(
    model: ModelArg,
    *,
    load: ModelOptions,
    data: DataOptions,
    settings: SetOpt = None,
    dest: OutputOptions,
    runtime: RunOptions,
    **kw,
):
    """Prune a trained model and show the numbers before and after.

    Examples:

        compress prune lenet5.pt --method threshold --sparsity 0.92 --train-data mnist5k --epochs 8 -o lenet5-pruned.pt

        compress prune resnet20.pt --method l1-filter --ratio 0.5 --train-data "mnist5k?size=32" --epochs 3 -o r20-l1.pt

        compress prune resnet20.pt --method channel-union --train-data "mnist5k?size=32" --epochs 4 -o r20-cu.pt
    """
    from compress.errors import UsageError

    s = spec()
    method, sensitivity, budget, epochs = kw.pop("method"), kw.pop("sensitivity"), kw.pop("budget"), kw["epochs"]
    # a method that fine-tunes by default (threshold: 3 epochs) needs --train-data unless told --epochs 0: without
    # data a 90%-pruned model would only be destroyed
    needs_train = (
        method == "channel-union"
        or bool(epochs)
        or (sensitivity and method == "l1-filter")
        or (epochs is None and s.default(method, "finetune.epochs") > 0)
    )
    if kw.get("target_latency") is not None and method != "l1-filter":
        raise UsageError("--target-latency is for --method l1-filter (channel-union: --target-macs)")
    if (kw.get("target_macs") is not None or kw.get("target_params") is not None) and method == "threshold":
        raise UsageError(
            "--target-macs / --target-params are for l1-filter and channel-union (threshold pruning "
            "leaves the layers' shapes, so their MACs: give --sparsity)"
        )
    inp = command_inputs(model, load, data, dest, runtime, need_train=needs_train)
    extra: dict = {}
    fixed: dict = {}
    if method == "threshold" and kw.get("sparsity") is None and kw.get("quality") is None:
        fixed["sparsity"] = 0.9
    if method == "l1-filter" and sensitivity:
        folder = dest.report or str(Path(dest.output).with_suffix("")) + "-sensitivity"
        fixed["ratio"] = _sensitivity(inp, folder, budget, s.opts["ratio"].parse(kw["ratio"]), extra)
    cfg = s.config(method, kw, **fixed)
    res = run_command("prune", cfg, inp, dest, runtime, settings, on_event=_Progress(inp.metric.label), extra=extra)
    drop = res["before"].get("accuracy", 0) - res["after"].get("accuracy", 0)
    if budget is not None and sensitivity and drop > budget:
        err.print(
            f"warning: {inp.metric.label.removesuffix(' %')} dropped {drop:.2f} pt, more than --budget {budget:g}: "
            "the per-layer ratios were each within budget alone, but their losses add up. Lower --budget, or "
            "fine-tune (--epochs N)."
        )


class _Progress:
    """Each pruning round on stderr, its score named by the metric it was measured with (``label``)."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, kind: str, rec: dict) -> None:
        from compress.report.render import score_text

        acc = f", {score_text(rec['accuracy'], self.label)}" if "accuracy" in rec else ""
        if kind == "round":
            err.print(f"round {rec['round']}/{rec['of']}: sparsity {rec['sparsity']:.2%}{acc}")
        elif kind == "reconfigure":
            when = f"after epoch {rec['epoch']:g}" if "epoch" in rec else f"at step {rec['step']}"
            err.print(f"reconfiguration {when}: params {rec['params']:,}, MACs {rec['macs']:,}{acc}")


def _sensitivity(inp, folder, budget, ratio, extra):
    from compress.filesystem import write_text
    from compress.prune import ratios_for_budget
    from compress.prune import sensitivity as run_sens
    from compress.report.plots import sensitivity as plot_sensitivity
    from compress.report.render import score_text

    if inp.val is None:
        raise typer.BadParameter("--sensitivity needs --train-data (accuracy is measured on its held-out 20%)")
    sens = run_sens(inp.model, inp.val, input_shape=inp.input_shape, metric=inp.metric)
    rs = sens["ratios"]
    out.print(
        table(
            f"sensitivity ({inp.metric.label} by layer and ratio pruned; baseline "
            f"{score_text(sens['baseline'], inp.metric.label)})",
            ["layer", "channels", *[f"{r:.0%}" for r in rs]],
            [[n, row["channels"], *[row["accuracy"][r] for r in rs]] for n, row in sens["layers"].items()],
        )
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    png = Path(folder) / "sensitivity.png"
    plot_sensitivity(sens, png, inp.metric.label)
    import json

    write_text(Path(folder) / "sensitivity.json", json.dumps(sens, indent=2), force=True)
    err.print(f"sensitivity plot: {png}")
    extra["sensitivity"] = sens
    if budget is not None:
        ratio = ratios_for_budget(sens, budget)
        out.print(
            table(
                f"ratios for a {budget} pt budget per layer",
                ["layer", "ratio"],
                [[k, v] for k, v in ratio.items() if k != "_default"],
            )
        )
    return ratio
