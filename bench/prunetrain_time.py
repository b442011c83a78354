"""Training time, dense vs PruneTrain: ResNet-20 (width 0.5) from scratch on 32 x 32 digits (mnist5k?size=32,
80% trained on), the same init, epochs and seed; scored on MNIST's official test set. One run per call, so that
a shell loop can alternate dense and PruneTrain while the machine's load changes (the load is recorded):

    for m in channel-union dense channel-union dense; do
        python bench/prunetrain_time.py $m --test-data ../shared/data/mnist --json out-$m-$RANDOM.json
    done

PruneTrain's defaults here: --target-macs 0.4 --lasso-ratio 0.2 --cost-weight 1 --reconfig-every 0.25 (as measured
in docs/methods.md). Compare ``cpu_s`` as well as ``wall_s`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from compress import data as data_mod
from compress.models import create_model
from compress.prune.prunetrain import train_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["dense", "channel-union"])
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--target-macs", type=float, default=0.4)
    ap.add_argument("--lasso-ratio", type=float, default=0.2)
    ap.add_argument("--cost-weight", type=float, default=1.0)
    ap.add_argument("--reconfig-every", type=float, default=0.25)
    ap.add_argument("--freeze-last", type=float, default=0.25)
    ap.add_argument("--grow-batch", action="store_true")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="the model's initialisation and the training order")
    ap.add_argument("--test-data", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: two threads under load ran 14x slower
    ds = data_mod.load("mnist5k?size=32")
    tr, va = data_mod.split(ds, 0.2, seed=0)
    test = data_mod.load(f"{args.test_data}?size=32") if args.test_data else None
    torch.manual_seed(args.seed)
    model = create_model("resnet20", num_classes=10, in_channels=1, width=args.width)
    kw = {}
    if args.method != "dense":
        kw = {
            "method": args.method,
            "target_macs": args.target_macs,
            "lasso_ratio": args.lasso_ratio,
            "cost_weight": args.cost_weight,
            "reconfig_every": args.reconfig_every,
            "freeze_last": args.freeze_last,
            "grow_batch": args.grow_batch,
        }
    load = os.getloadavg()
    rep = train_model(
        model, tr, val=va, test=test, epochs=args.epochs, lr=0.05, batch_size=64, augment=2, seed=args.seed,
        progress=lambda line: print(line, flush=True), **kw,
    ).report  # fmt: skip
    rep["load_before"], rep["load_after"] = load, os.getloadavg()
    print(json.dumps({"total": rep["total"], "final": rep["final"], "load": [load, rep["load_after"]]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
