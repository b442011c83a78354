""".cpz beside NNCodec (MPEG NNR / DeepCABAC) on the same trained weights, at equal test accuracy.

    NNCODEC_PYTHON=/work/nncodec-env/bin/python python bench/nncodec_side.py lenet5 > lenet5.json

For a model of the bench (``bench.conftest.trained``): the default pipeline's .cpz (Huffman), the same
pipeline with rate-distortion quantization (``rd_lambda`` listed beside ``bits``), and NNCodec at each qp
on the weights of the default .cpz (pruned and quantized, no fine-tuning after NNCodec), each scored on
the bench's test set (the official MNIST test set when it is on disk). Bytes are whole files: the .cpz
holds its architecture, NNCodec's bitstream none, so the .cpz's tensor sections alone are given too.
``match`` names, for each .cpz row, the smallest NNCodec bitstream whose accuracy is equal or better,
and the byte ratio .cpz / NNCodec. A context-adaptive .cpz coder, when ``compress encode --coder``
offers one (``compress.coding.streams.CODERS``), adds its rows: ".cpz (context-adaptive)".
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

QPS = (-8, -14, -20, -26, -32, -38)
RD_LAMBDAS = (0.0, 0.03, 0.1)
# model -> (epochs, input size, lr) as the bench trains it
MODELS = {"lenet5": (15, 28, 1e-3), "lenet300": (15, 28, 1e-3), "resnet20": (4, 32, 2e-3)}


LABELS = {"context": "context-adaptive"}


def _coders() -> list[str]:
    """The .cpz coders beyond Huffman, where the container offers a choice (``compress.coding.streams.CODERS``,
    ``compress encode --coder``; the h-ctx branch): none before it lands."""
    try:
        from compress.coding import streams
    except ImportError:
        return []
    return [c for c in getattr(streams, "CODERS", ()) if c not in ("auto", "huffman")]


def cpz_row(model: torch.nn.Module, test, label: str, **encode_kw) -> dict:
    """Encode (timed), decode (timed), score the decoded model."""
    from compress.cpz.container import decode_model, encode_model, read_manifest
    from compress.scoring import evaluate

    t0 = time.perf_counter()
    blob, _ = encode_model(model, graph=True, **encode_kw)
    t1 = time.perf_counter()
    dec = decode_model(blob)
    t2 = time.perf_counter()
    _, start = read_manifest(blob)
    return {
        "row": label,
        "bytes": len(blob),
        "tensor_bytes": len(blob) - start - 4,
        "accuracy": round(evaluate(dec, test), 2),
        "encode_s": round(t1 - t0, 3),
        "decode_s": round(t2 - t1, 3),
        "_blob": blob,
    }


def nncodec_rows(model: torch.nn.Module, test, py: str, work: Path, qps=QPS) -> list[dict]:
    from compress.scoring import evaluate

    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "w.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    script = Path(__file__).with_name("nncodec_peer.py")
    cmd = [py, str(script), "code", str(work / "w.npz"), str(work / "out"), "--qp", *map(str, qps)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ""})
    sizes = json.loads((work / "out" / "sizes.json").read_text())
    rows = []
    for qp in qps:
        dec = np.load(work / "out" / f"decoded_qp{qp}.npz")
        m = copy.deepcopy(model)
        m.load_state_dict({k: torch.from_numpy(dec[k]) for k in dec.files})
        s = sizes[str(qp)]
        rows.append(
            {
                "row": f"NNCodec qp {qp}",
                "qp": qp,
                "bytes": s["bytes"],
                "accuracy": round(evaluate(m, test), 2),
                "encode_s": s["encode_s"],
                "decode_s": s["decode_s"],
            }
        )
    return rows


def match(cpz: list[dict], peer: list[dict]) -> list[dict]:
    """For each .cpz row: the smallest NNCodec bitstream at equal or better accuracy, and the ratios."""
    out = []
    for r in cpz:
        ok = [p for p in peer if p["accuracy"] >= r["accuracy"]]
        if not ok:
            out.append({"row": r["row"], "qp": None})
            continue
        p = min(ok, key=lambda p: p["bytes"])
        out.append(
            {
                "row": r["row"],
                "qp": p["qp"],
                "nncodec_bytes": p["bytes"],
                "ratio": round(r["bytes"] / p["bytes"], 3),
                "tensor_ratio": round(r["tensor_bytes"] / p["bytes"], 3),
            }
        )
    return out


def side_by_side(name: str, test, py: str, work: Path, qps=QPS, rd_lambdas=RD_LAMBDAS) -> dict:
    """Both pipelines, the context-adaptive coder if any, NNCodec at each qp; timings on this machine."""
    from bench.conftest import VAL_FRACTION, trained
    from compress import data as data_mod
    from compress.recipe import Recipe
    from compress.search import pipeline

    epochs, size, lr = MODELS[name]
    base = trained(name, epochs, size=size, lr=lr)
    ds = data_mod.load("mnist5k" + (f"?size={size}" if size != 28 else ""))
    root = Path(__file__).resolve().parent.parent
    recipe = Recipe.load(root / "docs" / "recipes" / "deep-compression.toml").to_dict()  # the default, written out
    rows, times = [], {}
    t0 = time.perf_counter()
    m, _ = pipeline(copy.deepcopy(base), ds, recipe=recipe, max_accuracy_drop=0.5, val_fraction=VAL_FRACTION)
    times["pipeline_s"] = round(time.perf_counter() - t0, 1)
    coders = _coders()
    huffman = {"coder": "huffman"} if coders else {}  # once there is a choice, the Huffman row asks for it
    rows.append(cpz_row(m, test, ".cpz (Huffman)", **huffman))
    for coder in coders:
        rows.append(cpz_row(m, test, f".cpz ({LABELS.get(coder, coder)})", coder=coder))
    if not rd_lambdas:
        return _finish(name, base, test, rows, nncodec_rows(m, test, py, work), times)
    for st in recipe["stages"]:  # every (bits, rd_lambda) pair a candidate, as `rd_lambda = [...]` in a recipe
        if st["method"] == "quantize":
            st["candidates"] = [{**c, "rd_lambda": lam} for c in st["candidates"] for lam in rd_lambdas]
    t0 = time.perf_counter()
    mr, summary = pipeline(copy.deepcopy(base), ds, recipe=recipe, max_accuracy_drop=0.5, val_fraction=VAL_FRACTION)
    times["pipeline_rd_s"] = round(time.perf_counter() - t0, 1)
    kept = [s.kept.options if s.kept else None for s in summary.stages]
    rows.append({**cpz_row(mr, test, ".cpz (Huffman, RD quantization)", **huffman), "kept": kept})
    for coder in coders:
        rows.append(cpz_row(mr, test, f".cpz ({LABELS.get(coder, coder)}, RD quantization)", coder=coder))
    return _finish(name, base, test, rows, nncodec_rows(m, test, py, work), times)


def _finish(name, base, test, rows, peer, times) -> dict:
    from compress.scoring import evaluate

    for r in rows:
        r.pop("_blob", None)
    return {
        "model": name,
        "base_accuracy": round(evaluate(base, test), 2),
        "cpz": rows,
        "nncodec": peer,
        "match": match(rows, peer),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        **times,
    }


def main(argv=None) -> int:
    import argparse
    import tempfile

    from bench.conftest import mnist_test_dir
    from compress import data as data_mod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--rd-lambdas", default=",".join(map(str, RD_LAMBDAS)), help="'' skips the RD pipeline")
    a = ap.parse_args(argv)
    py = os.environ.get("NNCODEC_PYTHON")
    if not py:
        print("nncodec_side: set NNCODEC_PYTHON to a Python with nncodec (make nncodec-env)", file=sys.stderr)
        return 2
    size = MODELS[a.model][1]
    d = mnist_test_dir()
    if d is None:
        print("nncodec_side: the official MNIST test set is not on disk (COMPRESS_MNIST_TEST)", file=sys.stderr)
        return 2
    test = data_mod.load(f"{d}" + (f"?size={size}" if size != 28 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        lams = [float(x) for x in a.rd_lambdas.split(",") if x]
        print(json.dumps(side_by_side(a.model, test, py, Path(tmp), rd_lambdas=lams)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
