"""``compress factorize``: truncated-SVD factorization of Linear and Conv layers, its options made from
FactorizeConfig (``config_options``)."""

from __future__ import annotations

import functools

from compress.cli.app import app
from compress.cli.common import out, table
from compress.cli.config_options import ConfigOptions, Field
from compress.cli.harness import command_inputs, run_command
from compress.cli.options import (
    DataOptions,
    LazyCommand,
    ModelArg,
    ModelOptions,
    OutputOptions,
    RunOptions,
    SetOpt,
    lazy,
)

FIELDS = {
    "energy": Field(note="Give one of --energy, --rank-ratio, --rank."),
    "epochs": Field(
        kw={"min": 0}, help="Fine-tuning epochs (0: none; with --train-data BatchNorm is re-estimated anyway)."
    ),
}


@functools.cache
def spec() -> ConfigOptions:
    from compress.factorize import FactorizeConfig

    return ConfigOptions({"factorize": FactorizeConfig}, FIELDS)


@app.command(cls=LazyCommand)
@lazy(lambda: spec().params())
def factorize(
    model: ModelArg,
    *,
    load: ModelOptions,
    data: DataOptions,
    settings: SetOpt = None,
    dest: OutputOptions,
    runtime: RunOptions,
    **kw,
):
    """Replace Linear/Conv layers by two thin ones (truncated SVD) where that is smaller.

    Examples:

        compress factorize lenet300.pt --energy 0.8 --train-data mnist5k --epochs 3 -o lenet300-svd.pt

        compress factorize resnet20.pt --rank-ratio 0.5 --train-data "mnist5k?size=32" -o r20-svd.pt

    With --train-data and no --epochs, only BatchNorm statistics are re-estimated (no weight trains).
    """
    cfg = spec().config("factorize", kw)
    inp = command_inputs(model, load, data, dest, runtime, need_train=bool(kw["epochs"]))
    res = run_command("factorize", cfg, inp, dest, runtime, settings)
    rows = res["layers_changed"]
    out.print(
        table(
            "layers",
            ["layer", "shape", "rank", "params before", "params after", "rel. error", "action"],
            [
                [
                    r["name"],
                    "x".join(map(str, r["shape"])),
                    f"{r.get('rank', '-')}/{r['full_rank']}",
                    r["params_before"],
                    r["params_after"],
                    r["error"],
                    r["action"] + (f" ({r['reason']})" if r.get("reason") else ""),
                ]
                for r in rows
            ],
        )
    )
