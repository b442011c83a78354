"""``compress prune``: threshold, l1-filter and channel-union pruning."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from compress.cli import app
from compress.cli import common as c
from compress.cli.common import err, load_options, make_config, out, table, use_threads, with_settings
from compress.cli.harness import TaskOptions, load_inputs, parse_mapping, patterns, run_command

# The importances compress registers (compress.prune.importance.IMPORTANCES), as --help names them. The registry
# itself needs torch, which `--help` does not import; tests/test_pipeline_help.py checks this lists all of them.
IMPORTANCES_HELP = {"l1": "l1 (Li et al.)", "l2": "l2",
                    "bn-scale": "bn-scale (|gamma| of the BatchNorm after them, Network Slimming)",
                    "group-lasso": "group-lasso",
                    "taylor": "taylor (first-order loss change, Molchanov et al.; needs --train-data)"}


class PruneMethod(str, Enum):
    threshold = "threshold"
    l1_filter = "l1-filter"
    channel_union = "channel-union"


@app.command()
def prune(model: c.ModelArg, output: c.OutOpt,
          method: Annotated[PruneMethod, typer.Option("--method", "-m", help="Pruning method.")] = PruneMethod.threshold,
          arch: c.ArchOpt = None, trust_pickle: c.TrustOpt = False, train_data: c.TrainDataOpt = None,
          test_data: c.TestDataOpt = None,
          epochs: Annotated[Optional[float], typer.Option(
              "--epochs", min=0, show_default=False, help="Total fine-tuning epochs (default: threshold 3, split "
              "over --rounds; l1-filter 0; channel-union 4).")] = None,
          lr: Annotated[Optional[float], typer.Option(
              "--lr", show_default=False, help="Learning rate (default: 0.001; channel-union 0.02, SGD).")] = None,
          layers: c.LayersOpt = None, exclude: c.ExcludeOpt = None,
          sparsity: Annotated[Optional[str], typer.Option(
              "--sparsity", help="threshold: target sparsity, global (0.92) or per layer/type (conv=0.6,linear=0.95).")] = None,
          quality: Annotated[Optional[str], typer.Option(
              "--quality", help="threshold: threshold = quality x std of each layer (instead of --sparsity).")] = None,
          rounds: Annotated[Optional[int], typer.Option("--rounds", show_default=False,
                                                        help="threshold: pruning rounds (--epochs split over them) "
                                                        "(default: ThresholdConfig's, 3).")] = None,
          allocate: Annotated[Optional[str], typer.Option(
              "--allocate", show_default=False, help="threshold: how a global --sparsity is shared among layers: "
              "sensitivity (measured loss per weight removed; needs --train-data; the default) or std (one quality "
              "x std rule).")] = None,
          schedule: Annotated[Optional[str], typer.Option(
              "--schedule", show_default=False, help="threshold: sparsity over the rounds: cubic (Zhu & Gupta; the "
              "default) or geometric.")] = None,
          ratio: Annotated[str, typer.Option(
              "--ratio", help="l1-filter: fraction (0.5) or count (8) of filters per group, or per layer "
                              "(layer1.0.conv1=0.3,_default=0.5).")] = "0.5",
          round_to: Annotated[Optional[int], typer.Option(
              "--round-to", min=1, show_default=False, help="l1-filter: keep a multiple of this many channels per "
              "group (default: 8 on a CUDA device, else 1).")] = None,
          target_macs: Annotated[Optional[float], typer.Option(
              "--target-macs", help="l1-filter, channel-union: prune to this many MACs, a fraction of the input's (0.5) or a count "
              "(2e6), channels ranked across layers (instead of --ratio).")] = None,
          target_params: Annotated[Optional[float], typer.Option(
              "--target-params", help="l1-filter, channel-union: the same for parameters.")] = None,
          importance: Annotated[str, typer.Option(
              "--importance", help=f"l1-filter: how channels are ranked: {', '.join(IMPORTANCES_HELP.values())}; or "
              "one registered with compress.prune.register_importance.")] = "l1",
          target_latency: Annotated[Optional[float], typer.Option(
              "--target-latency", help="l1-filter: prune to this fraction of the input's batch-1 latency, timed "
              "on this machine (0.6).")] = None,
          sensitivity: Annotated[bool, typer.Option("--sensitivity", help="l1-filter: prune each layer alone at "
                                                    "several ratios first, and show accuracy per layer and ratio.")] = False,
          budget: Annotated[Optional[float], typer.Option(
              "--budget", help="l1-filter with --sensitivity: per-layer ratios from this accuracy drop (pt).")] = None,
          lasso_ratio: Annotated[Optional[float], typer.Option(
              "--lasso-ratio", help="channel-union: group-lasso strength, larger prunes more "
                                    "(default: ChannelUnionConfig's, 0.8).")] = None,
          reconfig_interval: Annotated[int, typer.Option("--reconfig-interval", help="channel-union: epochs "
                                                         "between reconfigurations.")] = 1,
          input_shape: c.InputShapeOpt = None, report: c.ReportOpt = None, json_out: c.JsonOpt = None,
          no_latency: c.NoLatencyOpt = False, threads: c.ThreadsOpt = None, loss: c.LossOpt = None, val_data: c.ValDataOpt = None,
          metric: c.MetricOpt = None, workers: c.WorkersOpt = None, distill: c.DistillOpt = None,
          settings: c.SetOpt = None, force: c.ForceOpt = False):
    """Prune a trained model and show the numbers before and after.

    Examples:

        compress prune lenet5.pt --method threshold --sparsity 0.92 --train-data mnist5k --epochs 8 -o lenet5-pruned.pt

        compress prune resnet20.pt --method l1-filter --ratio 0.5 --train-data "mnist5k?size=32" --epochs 3 -o r20-l1.pt

        compress prune resnet20.pt --method channel-union --train-data "mnist5k?size=32" --epochs 4 -o r20-cu.pt
    """
    from compress.config import Config, Select
    from compress.errors import UsageError
    from compress.prune import ChannelUnionConfig, L1FilterConfig, ThresholdConfig

    # threshold pruning fine-tunes by default (3 epochs): without data it would only destroy (a 90%-pruned
    # LeNet-5 scored 16% and exited 0), so it needs --train-data unless told --epochs 0
    needs_train = method == PruneMethod.channel_union or bool(epochs) or (sensitivity and method == PruneMethod.l1_filter) \
        or (method == PruneMethod.threshold and epochs is None)
    if target_latency is not None and method != PruneMethod.l1_filter:
        raise UsageError("--target-latency is for --method l1-filter (channel-union: --target-macs)")
    if (target_macs is not None or target_params is not None) and method == PruneMethod.threshold:
        raise UsageError("--target-macs / --target-params are for l1-filter and channel-union (threshold pruning "
                         "leaves the layers' shapes, so their MACs: give --sparsity)")
    use_threads(threads)
    inp = load_inputs(model, output, force, load_options(arch, trust_pickle, input_shape), train_data, test_data,
                      need_train=needs_train, task=TaskOptions(loss, metric, workers, val_data))
    extra: dict = {}
    cls: type[Config]
    if method == PruneMethod.threshold:
        cls, opts = ThresholdConfig, {"sparsity": parse_mapping(sparsity, "--sparsity"),
                                      "quality": parse_mapping(quality, "--quality"), "rounds": rounds,
                                      "allocate": allocate, "schedule": schedule}
        if sparsity is None and quality is None:
            opts["sparsity"] = 0.9
    elif method == PruneMethod.l1_filter:
        r = parse_mapping(ratio, "--ratio", cast=_num)
        if sensitivity:
            r = _sensitivity(inp, report or str(Path(output).with_suffix("")) + "-sensitivity", budget, r, extra)
        cls, opts = L1FilterConfig, {"ratio": r, "round_to": round_to, "target_macs": _target(target_macs),
                                     "target_params": _target(target_params), "target_latency": target_latency,
                                     "importance": importance}
    else:
        cls, opts = ChannelUnionConfig, {"reconfig_interval": reconfig_interval, "target_macs": _target(target_macs),
                                         "target_params": _target(target_params)}
        if lasso_ratio is not None:
            opts["lasso_ratio"] = lasso_ratio
    ft = make_config(cls.part, "finetune", epochs=epochs, lr=lr, distill=distill)
    sel = make_config(Select, names=patterns(layers), exclude=patterns(exclude))
    cfg = make_config(cls, **{k: v for k, v in opts.items() if v is not None}, finetune=ft, select=sel)  # None: the default
    cfg = with_settings(cfg, settings)
    res = run_command("prune", cfg, inp, output, force, report, json_out, on_event=_Progress(inp.metric.label), extra=extra,
                      latency=not no_latency)
    drop = res["before"].get("accuracy", 0) - res["after"].get("accuracy", 0)
    if budget is not None and sensitivity and drop > budget:
        err.print(f"warning: {inp.metric.label.removesuffix(' %')} dropped {drop:.2f} pt, more than --budget {budget:g}: the per-layer "
                  "ratios were each within budget alone, but their losses add up. Lower --budget, or "
                  "fine-tune (--epochs N).")


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


def _target(v: Optional[float]):
    """2e6 -> 2000000 (a count); 0.5 stays a fraction."""
    return int(v) if v is not None and v >= 1 and v == int(v) else v


def _num(v: str):
    v = v.strip()
    return int(v) if v.isdigit() else float(v)


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
    out.print(table(f"sensitivity ({inp.metric.label} by layer and ratio pruned; baseline "
                    f"{score_text(sens['baseline'], inp.metric.label)})", ["layer", "channels", *[f"{r:.0%}" for r in rs]],
                    [[n, row["channels"], *[row["accuracy"][r] for r in rs]] for n, row in sens["layers"].items()]))
    Path(folder).mkdir(parents=True, exist_ok=True)
    png = Path(folder) / "sensitivity.png"
    plot_sensitivity(sens, png, inp.metric.label)
    import json
    write_text(Path(folder) / "sensitivity.json", json.dumps(sens, indent=2), force=True)
    err.print(f"sensitivity plot: {png}")
    extra["sensitivity"] = sens
    if budget is not None:
        ratio = ratios_for_budget(sens, budget)
        out.print(table(f"ratios for a {budget} pt budget per layer", ["layer", "ratio"],
                        [[k, v] for k, v in ratio.items() if k != "_default"]))
    return ratio
