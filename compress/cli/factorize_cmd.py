"""``compress factorize``: truncated-SVD factorization of Linear and Conv layers."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import app
from .common import (ArchOpt, EpochsOpt, ForceOpt, InputShapeOpt, JsonOpt, ModelArg, OutOpt, ReportOpt,
                     TestDataOpt, TrainDataOpt, TrustOpt, emit_json, err, make_config, out, table)
from .stage import finish, start


@app.command()
def factorize(model: ModelArg, output: OutOpt,
              energy: Annotated[Optional[float], typer.Option("--energy", help="Kept energy (0.8).")] = None,
              rank_ratio: Annotated[Optional[float], typer.Option("--rank-ratio", help="Rank / full rank.")] = None,
              rank: Annotated[Optional[int], typer.Option("--rank", help="Fixed rank.")] = None,
              layers: Annotated[Optional[str], typer.Option("--layers", help="Comma-separated glob patterns of "
                                                            "layer names (fc*,layer3.*).")] = None,
              arch: ArchOpt = None, trust_pickle: TrustOpt = False, train_data: TrainDataOpt = None,
              test_data: TestDataOpt = None, epochs: EpochsOpt = 0.0,
              lr: Annotated[float, typer.Option("--lr")] = 1e-3, input_shape: InputShapeOpt = None,
              report: ReportOpt = None, json_out: JsonOpt = None, force: ForceOpt = False):
    """Replace Linear/Conv layers by two thin ones (truncated SVD) where that is smaller.

    Examples:

        compress factorize lenet300.pt --energy 0.8 --train-data mnist5k --epochs 3 -o lenet300-svd.pt

        compress factorize resnet20.pt --rank-ratio 0.5 --train-data "mnist5k?size=32" -o r20-svd.pt

    With --train-data and no --epochs, only BatchNorm statistics are re-estimated (no weight trains).
    """
    import torch.nn as nn

    from ..factorize import FactorizeConfig, factorize as run

    cfg = make_config(FactorizeConfig, energy=energy, rank_ratio=rank_ratio, rank=rank, epochs=epochs, lr=lr,
                      layers=tuple(p.strip() for p in layers.split(",")) if layers else ())
    st = start(model, output, force, arch, trust_pickle, train_data, test_data, input_shape,
               need_train=epochs > 0)
    if st.train is None and any(isinstance(m, nn.BatchNorm2d) for m in st.model.modules()):
        err.print("note: without --train-data, BatchNorm statistics are not re-estimated after factorization")
    run(st.model, cfg, st.train, st.val)
    rows = st.model.compress_meta["history"][-1]["layers"]
    out.print(table("layers", ["layer", "shape", "rank", "params before", "params after", "rel. error", "action"],
                    [[r["name"], "x".join(map(str, r["shape"])), f"{r.get('rank', '-')}/{r['full_rank']}",
                      r["params_before"], r["params_after"], r["error"],
                      r["action"] + (f" ({r['reason']})" if r.get("reason") else "")] for r in rows]))
    result = finish(st, st.model, output, force, "factorize", cfg, report, {"layers_factorized": rows})
    if json_out:
        emit_json(result, json_out, force)
