"""The extension points measured against what they extend: every registered quantization scheme on the
same trained LeNet-5, every registered channel importance on the same trained ResNet-20 at the same MACs."""

from __future__ import annotations

import copy

import pytest

from bench.conftest import VAL_FRACTION, once, trained
from compress import data as data_mod
from compress.config import FineTune
from compress.counting import count_macs
from compress.cpz.container import encode_model
from compress.method import Context, run
from compress.prune import IMPORTANCES, L1FilterConfig
from compress.quant_state import SCHEMES
from compress.quantize import QuantConfig
from compress.scoring import evaluate
from compress.train import fit


@pytest.mark.slow
def test_schemes_side_by_side(benchmark, eval_sets):
    """4 and 3 bits, no fine-tuning, every layer (biases on 8 bits): accuracy, weight SQNR and .cpz bytes."""
    model = trained("lenet5", 3)
    test, ev = eval_sets[28]
    dense = sum(p.numel() for p in model.parameters()) * 4
    rows = {}

    def all_schemes():
        for bits in (4, 3):
            for name in SCHEMES:
                res = run("quantize", copy.deepcopy(model), QuantConfig(bits=bits, scheme=name))
                blob, _ = encode_model(res.model)
                sqnr = sum(r["sqnr_db"] * r["params"] for r in res.layers) / sum(r["params"] for r in res.layers)
                rows[f"{name} {bits}-bit"] = {
                    "accuracy": round(evaluate(res.model, test), 2),
                    "sqnr_db": round(sqnr, 2),
                    "cpz_bytes": len(blob),
                    "ratio": round(dense / len(blob), 2),
                }

    once(benchmark, all_schemes)
    benchmark.extra_info.update(base_accuracy=round(evaluate(model, test), 2), schemes=rows, eval_data=ev)
    assert rows["pow2 4-bit"]["accuracy"] > 90


@pytest.mark.slow
def test_importances_side_by_side(benchmark, eval_sets):
    """l1-filter --target-macs 0.5 on the trained ResNet-20 by each registered importance: test accuracy
    right after pruning and after the same 1 epoch of fine-tuning."""
    model = trained("resnet20", 4, size=32, lr=2e-3)
    test, ev = eval_sets[32]
    tr, _ = data_mod.split(data_mod.load("mnist5k?size=32"), VAL_FRACTION)
    shape = (1, 1, 32, 32)
    base = count_macs(model, shape)
    rows = {}

    def all_importances():
        for name in sorted(IMPORTANCES):
            res = run(
                "prune",
                copy.deepcopy(model),
                L1FilterConfig(target_macs=0.5, importance=name, finetune=FineTune(epochs=0)),
                Context(train=tr, input_shape=shape),
            )
            m = res.model
            row = {
                "macs_fraction": round(count_macs(m, shape) / base, 3),
                "accuracy_pruned": round(evaluate(m, test), 2),
                "seconds": round(res.seconds, 1),
            }
            fit(m, tr, FineTune(epochs=1, lr=1e-3, augment=2))
            row["accuracy"] = round(evaluate(m, test), 2)
            rows[name] = row

    once(benchmark, all_importances)
    benchmark.extra_info.update(base_accuracy=round(evaluate(model, test), 2), importances=rows, eval_data=ev)
    assert all(abs(r["macs_fraction"] - 0.5) < 0.03 for r in rows.values())
