"""``compress factorize``: truncated-SVD factorization of Linear and Conv layers."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from compress.cli import app
from compress.cli import common as c
from compress.cli.common import load_options, make_config, out, table, use_threads, with_settings
from compress.cli.harness import TaskOptions, load_inputs, patterns, run_command


@app.command()
def factorize(model: c.ModelArg, output: c.OutOpt,
              energy: Annotated[Optional[float], typer.Option("--energy", help="Keep the smallest rank holding this "
                                                              "fraction of the squared singular values, e.g. 0.8. "
                                                              "Give one of --energy, --rank-ratio, --rank.")] = None,
              rank_ratio: Annotated[Optional[float], typer.Option("--rank-ratio", help="Rank as a fraction of full "
                                                                  "rank, e.g. 0.5.")] = None,
              rank: Annotated[Optional[int], typer.Option("--rank", help="A fixed rank, e.g. 16.")] = None,
              layers: c.LayersOpt = None, exclude: c.ExcludeOpt = None,
              arch: c.ArchOpt = None, trust_pickle: c.TrustOpt = False, train_data: c.TrainDataOpt = None,
              test_data: c.TestDataOpt = None,
              epochs: Annotated[float, typer.Option("--epochs", min=0, help="Fine-tuning epochs (0: none; with "
                                                    "--train-data BatchNorm is re-estimated anyway).")] = 0.0,
              lr: Annotated[float, typer.Option("--lr", help="Fine-tuning learning rate.")] = 1e-3,
              input_shape: c.InputShapeOpt = None,
              report: c.ReportOpt = None, json_out: c.JsonOpt = None, no_latency: c.NoLatencyOpt = False, threads: c.ThreadsOpt = None,
              loss: c.LossOpt = None, val_data: c.ValDataOpt = None, metric: c.MetricOpt = None, workers: c.WorkersOpt = None, distill: c.DistillOpt = None,
              settings: c.SetOpt = None, force: c.ForceOpt = False):
    """Replace Linear/Conv layers by two thin ones (truncated SVD) where that is smaller.

    Examples:

        compress factorize lenet300.pt --energy 0.8 --train-data mnist5k --epochs 3 -o lenet300-svd.pt

        compress factorize resnet20.pt --rank-ratio 0.5 --train-data "mnist5k?size=32" -o r20-svd.pt

    With --train-data and no --epochs, only BatchNorm statistics are re-estimated (no weight trains).
    """
    from compress.config import Select
    from compress.factorize import FactorizeConfig

    ft = make_config(FactorizeConfig.part, "finetune", epochs=epochs, lr=lr, distill=distill)
    cfg = make_config(FactorizeConfig, energy=energy, rank_ratio=rank_ratio, rank=rank, finetune=ft,
                      select=make_config(Select, names=patterns(layers), exclude=patterns(exclude)))
    use_threads(threads)
    inp = load_inputs(model, output, force, load_options(arch, trust_pickle, input_shape), train_data, test_data,
                      need_train=bool(epochs), task=TaskOptions(loss, metric, workers, val_data))
    cfg = with_settings(cfg, settings)
    res = run_command("factorize", cfg, inp, output, force, report, json_out, latency=not no_latency)
    rows = res["layers_changed"]
    out.print(table("layers", ["layer", "shape", "rank", "params before", "params after", "rel. error", "action"],
                    [[r["name"], "x".join(map(str, r["shape"])), f"{r.get('rank', '-')}/{r['full_rank']}",
                      r["params_before"], r["params_after"], r["error"],
                      r["action"] + (f" ({r['reason']})" if r.get("reason") else "")] for r in rows]))
