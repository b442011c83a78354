"""Training time, dense vs PruneTrain: a residual net (default ResNet-20 at width 0.5; ``--arch zoo:resnet56``,
``--arch pytorchcv:preresnet_cifar.preresnet20_cifar10``) from scratch on 32 x 32 digits (mnist5k?size=32, 80%
trained on), the same init, epochs and seed; scored on MNIST's official test set. One run per call, so that a
shell loop can alternate dense and PruneTrain while the machine's load changes (the load is recorded):

    for m in channel-union dense channel-union dense; do
        python bench/prunetrain_time.py $m --test-data ../shared/data/mnist --json out/$m-$RANDOM.json
    done
    python bench/prunetrain_time.py table out      # mean and spread of every (arch, method) in out/*.json
    python bench/prunetrain_time.py table out intro.md [out2 intro2.md ...]   # into docs/results.md

PruneTrain's defaults here: --target-macs 0.4 --lasso-ratio 0.2 --cost-weight 1 --reconfig-every 0.25 (as measured
in docs/methods.md). Compare ``cpu_s`` as well as ``wall_s`` on a shared machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

import torch

from compress import data as data_mod
from compress.models import create_model
from compress.prune.prunetrain import MIN_CHANNELS, train_model


def build(arch: str, width: float) -> torch.nn.Module:
    """``zoo:NAME`` (compress's zoo, at ``width``) or ``pytorchcv:MODULE.FUNCTION`` (a CIFAR model, one input
    channel)."""
    kind, _, name = arch.partition(":")
    if kind == "zoo":
        return create_model(name, num_classes=10, in_channels=1, width=width)
    if kind == "pytorchcv":  # MODULE.FUNCTION of pytorchcv.models (its model_provider imports torchvision's ops)
        import importlib

        module, _, func = name.rpartition(".")
        return getattr(importlib.import_module(f"pytorchcv.models.{module}"), func)(in_channels=1, num_classes=10)
    raise SystemExit(f"--arch: zoo:NAME or pytorchcv:MODULE.FUNCTION, not {arch!r}")


def _spread(vals: list[float], fmt: str) -> str:
    """mean (min-max) of the seeds' values ("-" for none)."""
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    return format(m, fmt) if len(vals) == 1 else f"{m:{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"


LASSO, TARGET = 0.2, 0.4  # the bench's --lasso-ratio and --target-macs (a dense run records neither)
SECTION = "## PruneTrain: training time, dense against channel-union (bench/prunetrain_time.py)"


def _per_seed(rows: list[dict], part: str, field: str, seed: int) -> float | None:
    """The mean of ``row[part][field]`` over the runs of ``seed``, None where there is none."""
    vals = [r[part][field] for r in rows if r["settings"]["seed"] == seed]
    return statistics.fmean(vals) if vals else None


def table(folder: str) -> list[str]:
    """Markdown rows of the runs in ``folder``: per (arch, method, settings), the mean and range over its runs, and
    the time ratios against the dense runs of the same arch and seeds (each seed's mean PruneTrain seconds over its
    mean dense seconds; wall and CPU: a run that waited for the core shows in wall seconds only)."""
    runs: dict[tuple, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        b, st = r.get("bench", {}), r["settings"]
        key = (b.get("arch", "zoo:resnet20"), b.get("width", 0.5), r["method"], bool(st.get("grow_batch")),
               st.get("min_channels", 1), st.get("lasso_ratio", LASSO), st.get("target_macs", TARGET))  # fmt: skip
        runs.setdefault(key, []).append(r)
    out = [
        "| arch | method | runs (seeds) | epochs | train s | time vs dense | CPU time vs dense | test % | drop (pt) | "
        "final MACs | training FLOPs vs dense | batch at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rs in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][2] != "dense", kv[0][3:])):
        arch, width, method, grow, min_channels, lasso, target = key
        dense = runs.get((arch, width, "dense", False, 1, LASSO, TARGET), [])
        seeds = sorted({r["settings"]["seed"] for r in rs})
        ratio, cpu, drop, flops = [], [], [], []
        for sd in seeds:
            t, td = (_per_seed(x, "total", "wall_s", sd) for x in (rs, dense))
            c, cd = (_per_seed(x, "total", "cpu_s", sd) for x in (rs, dense))
            a, ad = (_per_seed(x, "final", "test_score", sd) for x in (rs, dense))
            fl, fd = (_per_seed(x, "total", "train_flops", sd) for x in (rs, dense))
            if td:
                ratio.append(t / td)
                cpu.append(c / cd)
                drop.append(ad - a)
                flops.append(fl / fd)
        name = {"dense": "dense", "channel-union": "PruneTrain"}[method]
        name += (" + grow-batch" if grow else "") + (f", min-channels {min_channels}" if min_channels != 1 else "")
        name += f", lasso-ratio {lasso:g}" if lasso != LASSO else ""
        name += f", target-macs {target:g}" if target != TARGET else ""
        label = arch + (f" width {width}" if arch.startswith("zoo:") else "")
        pt = method != "dense"
        out.append(
            f"| {label} | {name} | {len(rs)} ({', '.join(map(str, seeds))}) | {rs[0]['settings']['epochs']:g} | "
            f"{_spread([r['total']['wall_s'] for r in rs], '.1f')} | "
            f"{_spread(ratio, '.3f') if pt else '1'} | {_spread(cpu, '.3f') if pt else '1'} | "
            f"{_spread([r['final']['test_score'] for r in rs], '.2f')} | {_spread(drop, '.2f') if pt else '-'} | "
            f"{_spread([r['final']['macs_fraction'] for r in rs], '.3f')} | {_spread(flops, '.3f') if pt else '1'} | "
            f"{_spread([float(r['epochs'][-1]['batch']) for r in rs], '.0f')} |"
        )
    return out


def splice(doc: str, section: list[str]) -> None:
    """Put ``section`` (its heading first) into the markdown file ``doc`` in place of the section of the same
    heading, or at its end."""
    with open(doc) as f:
        text = f.read().rstrip("\n")
    body = "\n".join(section)
    start = text.find(section[0])
    if start < 0:
        text = text + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(section[0]))
        text = text[:start] + body + (text[end:] if end >= 0 else "")
    with open(doc, "w") as f:
        f.write(text + "\n")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "table":  # table DIR | table DIR INTRO.md [DIR INTRO.md ...]
        if len(sys.argv) == 3:
            print("\n".join(table(sys.argv[2])))
            return
        section = [SECTION]
        for folder, intro in zip(sys.argv[2::2], sys.argv[3::2], strict=True):  # each table under its intro
            with open(intro) as f:
                section += ["", f.read().strip(), "", *table(folder)]
        return splice("docs/results.md", section)
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["dense", "channel-union"])
    ap.add_argument("--arch", default="zoo:resnet20", help="zoo:NAME (at --width) or pytorchcv:MODULE.FUNCTION")
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--target-macs", type=float, default=TARGET)
    ap.add_argument("--lasso-ratio", type=float, default=LASSO)
    ap.add_argument("--cost-weight", type=float, default=1.0)
    ap.add_argument("--reconfig-every", type=float, default=0.25)
    ap.add_argument("--freeze-last", type=float, default=0.25)
    ap.add_argument("--min-channels", type=int, default=MIN_CHANNELS)
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
    model = build(args.arch, args.width)
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
            "min_channels": args.min_channels,
        }
    load = os.getloadavg()
    rep = train_model(
        model, tr, val=va, test=test, epochs=args.epochs, lr=0.05, batch_size=64, augment=2, seed=args.seed,
        progress=lambda line: print(line, flush=True), **kw,
    ).report  # fmt: skip
    rep["load_before"], rep["load_after"] = load, os.getloadavg()
    rep["bench"] = {"arch": args.arch, "width": args.width if args.arch.startswith("zoo:") else None}
    print(json.dumps({"total": rep["total"], "final": rep["final"], "load": [load, rep["load_after"]]}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
