"""NNCodec (Fraunhofer HHI's implementation of MPEG NNR / DeepCABAC) on the weights compress pruned.

NNCodec is a peer, not a dependency: it wants torchvision, a CUDA build of torch and numpy<2, so it
lives in its own environment (see docs/results.md, "NNCodec beside .cpz"). This file has two halves
that talk through data-only .npz files:

    # in compress's environment: the pruned model's tensors (bench/test_bench_pipeline.py writes them)
    # in NNCodec's environment (imports nncodec and numpy only):
    $NNCODEC_PYTHON bench/nncodec_peer.py code pruned.npz out/ --qp -14 -20 -26
    # -> out/sizes.json and out/decoded_qp-20.npz per qp, which compress's side evaluates

Each qp's bitstream is NNCodec's own output (``return_bitstream=True``): its length is what is
counted. NNCodec stores no architecture; compress's .cpz bytes include it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def code(src: Path, out: Path, qps: list[int]) -> dict:
    import numpy as np
    from nncodec.nn import decode, encode

    params = {k: v.astype(np.float32) for k, v in np.load(src).items()}
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for qp in qps:
        args = {"qp": qp, "results": str(out), "verbose": False, "model": "peer"}
        bs = encode(params, args)
        dec = decode(bs, args)
        sizes[str(qp)] = len(bs)
        np.savez(out / f"decoded_qp{qp}.npz", **{k: np.asarray(dec[k], dtype=np.float32) for k in params})
    (out / "sizes.json").write_text(json.dumps(sizes))
    return sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("code", help="code and decode an .npz of tensors with NNCodec at each qp")
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--qp", type=int, nargs="+", default=[-14, -20, -26])
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    print(json.dumps(code(a.src, a.out, a.qp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
