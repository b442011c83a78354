"""NNCodec (Fraunhofer HHI's implementation of MPEG NNR / DeepCABAC) on the weights compress pruned.

NNCodec is a peer, not a dependency: it wants torchvision and numpy<2, so it lives in its own
environment (``make nncodec-env``, tools/nncodec_env.sh; see docs/development.md). This file has two
halves that talk through data-only .npz files:

    # in compress's environment: the pruned model's tensors (bench/test_bench_pipeline.py writes them)
    # in NNCodec's environment (imports nncodec and numpy only):
    $NNCODEC_PYTHON bench/nncodec_peer.py code pruned.npz out/ --qp -14 -20 -26
    # -> out/sizes.json ({qp: {bytes, encode_s, decode_s}}) and out/decoded_qp-20.npz per qp, which
    #    compress's side evaluates

Each qp's bitstream is NNCodec's own output (``encode`` returns it): its length is what is counted.
NNCodec stores no architecture; compress's .cpz bytes include it.

torchvision: nncodec's package imports it (and opencv, pandas, scikit-learn, h5py) for its own training
applications, never on the path that codes a dict of arrays. The torchvision wheels on disk are CUDA
builds whose operators do not load beside the CPU torch, so when ``import torchvision`` fails this file
puts an inert stand-in module in its place (its names build inert objects; none feeds the coder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class _Inert:
    """Stands for any torchvision name nncodec's imports touch; the weights coder never calls one."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):  # nncodec builds transforms at import time; building one is harmless
        return _Inert()

    def __getattr__(self, name):
        return _Inert()

    def __mro_entries__(self, bases):
        return (object,)


def _stand_in_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        import types
        from importlib.machinery import ModuleSpec

        def inert(name: str, attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Inert()

        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.models"):
            m = types.ModuleType(name)
            m.__spec__, m.__path__ = ModuleSpec(name, None), []
            m.__getattr__ = lambda attr, _n=name: inert(_n, attr)  # type: ignore[method-assign]
            sys.modules[name] = m


def code(src: Path, out: Path, qps: list[int]) -> dict:
    import time

    import numpy as np

    _stand_in_torchvision()
    from nncodec.nn import decode, encode

    params = {k: v.astype(np.float32) for k, v in np.load(src).items()}
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for qp in qps:
        args = {"qp": qp, "results": str(out), "verbose": False, "model": "peer"}
        t0 = time.perf_counter()
        bs = encode(params, args)
        t1 = time.perf_counter()
        dec = decode(bs, args)
        t2 = time.perf_counter()
        sizes[str(qp)] = {"bytes": len(bs), "encode_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3)}
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
