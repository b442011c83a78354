"""Speed verdicts are not noise: the same model timed against itself reads "same" (interval of the paired ratio)
in at least 19 of 20 runs, and a weight-quantized model (same FP32 compute) reads "same" against its input."""
from __future__ import annotations

import copy

import pytest

from compress.metrics import latencies, speed_change
from compress.quantize import QuantConfig
from compress.stages import quantize_

from .conftest import once, trained


@pytest.mark.slow
def test_same_model_reads_same(benchmark):
    model = trained("lenet5", 15)
    shape = (1, 1, 28, 28)
    verdicts = []

    def twenty():
        for _ in range(20):
            a, b = latencies([model, copy.deepcopy(model)], shape, runs=15)
            verdicts.append(speed_change(a["batch_1"], b["batch_1"], b["speedup"]["batch_1"]))
        q = quantize_(copy.deepcopy(model), QuantConfig(bits=8))
        a, b = latencies([model, q], shape, runs=15)
        verdicts.append(speed_change(a["batch_32"], b["batch_32"], b["speedup"]["batch_32"]))

    once(benchmark, twenty)
    same = sum(v.startswith("same") for v in verdicts[:20])
    benchmark.extra_info.update(same_of_20=same, verdicts=verdicts[:20], int8_weights_vs_fp32=verdicts[20])
    assert same >= 19
    assert verdicts[20].startswith("same")
