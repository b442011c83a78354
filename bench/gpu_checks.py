"""The GPU checks in one go: every command with --device, and ResNet-50 pruned vs dense latency.

Run on a machine with a GPU (the device tool's machines have torch, torchvision, timm; install this
package, torch-pruning and mlxtend from wheels):

    python bench/gpu_checks.py --device cuda --out gpu-checks.json

It prints one line per check and writes the numbers as JSON. ``--device cpu --quick`` runs the same
script here, smaller, as a smoke test (tests/test_models.py does not run it: it takes minutes).

1. Each command that trains or evaluates, through the CLI with ``--device``: zoo train, report,
   prune (threshold, l1-filter, channel-union with --train-data), quantize (k-means with
   --train-data), factorize, pipeline, encode/decode. Exit codes must be 0.
2. ResNet-50 (torchvision's if importable, else pytorchcv's), l1-filter 0.5 (kept channels rounded
   to 8 on CUDA), batch 64 at 224x224: latency of dense and pruned, fp32 and bfloat16 autocast,
   timed with CUDA events.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli_checks(device: str, quick: bool) -> dict:
    d = Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    data, data32 = (
        "mnist5k?limit=600" if quick else "mnist5k",
        "mnist5k?size=32&limit=600" if quick else "mnist5k?size=32",
    )
    exe = [sys.executable, "-m", "compress.cli", "--device", device, "-q"]
    steps = {
        "zoo train lenet5": ["zoo", "train", "lenet5", "--train-data", data, "--epochs", "1", "-o", d / "l5.pt"],
        "zoo train resnet20": [
            "zoo",
            "train",
            "resnet20",
            "--width",
            "0.5",
            "--train-data",
            data32,
            "--epochs",
            "1",
            "-o",
            d / "r20.pt",
        ],
        "report": ["report", d / "l5.pt", "--data", data],
        "prune threshold": [
            "prune",
            d / "l5.pt",
            "--sparsity",
            "0.9",
            "--train-data",
            data,
            "--epochs",
            "1",
            "-o",
            d / "p.pt",
        ],
        "prune l1-filter": [
            "prune",
            d / "r20.pt",
            "--method",
            "l1-filter",
            "--train-data",
            data32,
            "--epochs",
            "1",
            "-o",
            d / "l1.pt",
        ],
        "prune channel-union": [
            "prune",
            d / "r20.pt",
            "--method",
            "channel-union",
            "--train-data",
            data32,
            "--epochs",
            "1",
            "-o",
            d / "cu.pt",
        ],
        "quantize kmeans": [
            "quantize",
            d / "p.pt",
            "--bits",
            "4",
            "--scheme",
            "kmeans",
            "--train-data",
            data,
            "--epochs",
            "1",
            "-o",
            d / "q.pt",
        ],
        "factorize": [
            "factorize",
            d / "l5.pt",
            "--energy",
            "0.8",
            "--train-data",
            data,
            "--epochs",
            "1",
            "-o",
            d / "f.pt",
        ],
        "encode": ["encode", d / "q.pt", "-o", d / "q.cpz"],
        "decode": ["decode", d / "q.cpz", "-o", d / "d.pt"],
        "pipeline": [
            "pipeline",
            d / "l5.pt",
            "--train-data",
            data,
            "--recipe",
            "docs/recipes/demo.toml",
            "--max-accuracy-drop",
            "1",
            "-o",
            d / "l5.cpz",
        ],
    }
    out = {}
    for name, args in steps.items():
        t0 = time.perf_counter()
        r = subprocess.run(exe + [str(a) for a in args], capture_output=True, text=True)
        out[name] = {
            "exit": r.returncode,
            "seconds": round(time.perf_counter() - t0, 1),
            "error": r.stderr.strip().splitlines()[-1][:300] if r.returncode and r.stderr.strip() else "",
        }
        print(
            f"{'ok  ' if r.returncode == 0 else 'FAIL'} {name:22s} {out[name]['seconds']:7.1f}s {out[name]['error']}",
            flush=True,
        )
    return out


def resnet50():
    try:
        from torchvision.models import resnet50 as tv

        return tv(), "torchvision"
    except Exception:  # torchvision's compiled ops do not load beside some torch builds
        from pytorchcv.models.resnet import resnet50 as cv

        return cv(), "pytorchcv"


def latency_checks(device: str, quick: bool) -> dict:
    import torch

    from compress.counting import count_macs, count_params
    from compress.measure import latency_stats
    from compress.method import Context, run
    from compress.prune import L1FilterConfig

    torch.manual_seed(0)
    base, source = resnet50()
    base = base.eval().to(device)
    pruned = copy.deepcopy(base)
    size = 224  # pytorchcv's ResNet-50 pools a fixed 7x7 at the end
    batch = 2 if quick else 64
    shape = (1, 3, size, size)
    run("prune", pruned, L1FilterConfig(ratio=0.5), Context(input_shape=shape))
    out = {
        "model": f"resnet50 ({source})",
        "batch": batch,
        "input": size,
        "params": [count_params(base), count_params(pruned)],
        "macs": [count_macs(base, shape), count_macs(pruned, shape)],
        "channels_multiple_of_8": all(
            m.out_channels % 8 == 0 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)
        ),
    }
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        st = latency_stats([base, pruned], shape, batch=batch, runs=10 if quick else 30, dtype=dtype)
        out[name] = {"dense_ms": st[0]["ms"], "pruned_ms": st[1]["ms"], "speedup": round(st[0]["ms"] / st[1]["ms"], 3)}
        print(
            f"resnet50 l1 0.5 {name}: {st[0]['ms']:.2f} -> {st[1]['ms']:.2f} ms, {out[name]['speedup']:.2f}x",
            flush=True,
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small data and inputs (a smoke test on a CPU)")
    ap.add_argument("--out", type=Path, default=Path("gpu-checks.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    res = {"device": a.device, "commands": cli_checks(a.device, a.quick), "latency": latency_checks(a.device, a.quick)}
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        res["gpu"] = None
    a.out.write_text(json.dumps(res, indent=2))
    failed = [k for k, v in res["commands"].items() if v["exit"]]
    print(f"wrote {a.out}; {len(failed)} command(s) failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
