"""Rate-distortion k-means against fewer bits: .cpz bytes and test accuracy over ``rd_lambda``.

    python bench/rd_sweep.py MODEL.pt TEST_DATA [--finetune EPOCHS] [--train-data mnist5k] > rows.json

For each bits in --bits and λ in --lambdas: k-means with that λ (all Conv/Linear layers, biases on an 8-bit
grid), its .cpz bytes as ``compress encode`` writes them (graph included) and its top-1 on TEST_DATA; with
--finetune, the same after that many epochs of centroid training on the training split of --train-data
(80%, seed 0, as ``compress zoo train`` holds out 20%). One JSON row per run on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from compress import data as data_mod
from compress.config import FineTune
from compress.cpz.container import encode_model
from compress.model_io import load_model
from compress.quant_state import quantized_layers
from compress.quantize import QuantConfig, code_entropy, quantize_
from compress.scoring import evaluate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("test_data")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--lambdas", default="0,0.01,0.03,0.1,0.3")
    ap.add_argument("--finetune", type=float, default=0.0)
    ap.add_argument("--train-data", default="mnist5k")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = load_model(a.model)
    test = data_mod.load(a.test_data)
    train = data_mod.split(data_mod.load(a.train_data), 0.2, seed=0)[0] if a.finetune else None
    print(json.dumps({"model": a.model, "fp32_test_top1": evaluate(base, test)}), flush=True)
    for bits in [int(b) for b in a.bits.split(",")]:
        for lam in [float(x) for x in a.lambdas.split(",")]:
            if bits == 2 and lam:
                continue  # the fewer-bits reference is plain k-means
            for ep in sorted({0.0, a.finetune}):
                m = copy.deepcopy(base)
                t0 = time.perf_counter()
                ft = FineTune(epochs=ep, lr=1e-4, augment=0)
                quantize_(m, QuantConfig(bits=bits, scheme="kmeans", rd_lambda=lam, finetune=ft), train_data=train)
                secs = time.perf_counter() - t0
                blob, _ = encode_model(m, graph=True)
                ent = [(code_entropy(s, mod.weight.detach()), int((mod.weight != 0).sum())) for _, mod, s in
                       quantized_layers(m)]  # fmt: skip
                row = {
                    "bits": bits,
                    "rd_lambda": lam,
                    "finetune_epochs": ep,
                    "cpz_bytes": len(blob),
                    "test_top1": evaluate(m, test),
                    "bits_per_weight": sum(h * n for h, n in ent) / max(1, sum(n for _, n in ent)),
                    "levels": {n: len(s.codebook) for n, _, s in quantized_layers(m)},
                    "seconds": round(secs, 1),
                }
                print(json.dumps(row), flush=True)
                print(row, file=sys.stderr)


if __name__ == "__main__":
    main()
