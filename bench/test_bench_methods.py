"""One benchmark per method. Fast cases run by default; long ones are marked slow."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.conftest import once, record, train_split, trained
from compress.config import FineTune
from compress.counting import count_macs, count_nonzero, count_params
from compress.measure import latency_ms
from compress.prune import ChannelUnionConfig, L1FilterConfig, ThresholdConfig, prune_
from compress.quantize import QuantConfig, quantize_
from compress.scoring import evaluate


def test_threshold_lenet5(benchmark, eval_sets):
    """Han et al.: LeNet-5 >= 12x fewer nonzero weights, <= 0.5 pt drop, <= 8 epochs fine-tuning."""
    test, name = eval_sets[28]
    base = trained("lenet5", 15)
    tr, va = train_split()
    m = copy.deepcopy(base)
    once(
        benchmark,
        lambda: prune_(
            m, ThresholdConfig(sparsity=0.92, rounds=2, finetune=FineTune(epochs=8, lr=2e-3, augment=2)), tr, va
        ),
    )
    record(
        benchmark,
        ratio=count_params(m) / count_nonzero(m),
        accuracy=evaluate(m, test),
        base_accuracy=evaluate(base, test),
        latency_ms=latency_ms(m, (1, 1, 28, 28), 32),
        eval_name=name,
        metric="nonzero weights",
    )
    assert benchmark.extra_info["compression_ratio"] >= 12


@pytest.mark.parametrize("bits,scheme", [(8, "minmax"), (4, "mmse"), (4, "kmeans")])
def test_quantize_lenet5(benchmark, eval_sets, bits, scheme):
    test, name = eval_sets[28]
    base = trained("lenet5", 15)
    m = copy.deepcopy(base)
    once(benchmark, lambda: quantize_(m, QuantConfig(bits=bits, scheme=scheme)))
    from compress.cpz.container import encode_model

    size = len(encode_model(copy.deepcopy(m))[0])
    record(
        benchmark,
        ratio=4 * count_params(m) / size,
        accuracy=evaluate(m, test),
        base_accuracy=evaluate(base, test),
        latency_ms=latency_ms(m, (1, 1, 28, 28), 32),
        eval_name=name,
        cpz_bytes=size,
    )
    assert benchmark.extra_info["accuracy_drop"] <= (0.2 if bits == 8 else 1.0)


def test_factorize_lenet300(benchmark, eval_sets):
    """SVD: LeNet-300-100, energy 0.8, 3 epochs: >= 2.5x fewer params at <= 1 pt drop."""
    from compress import FactorizeConfig, factorize_

    test, name = eval_sets[28]
    base = trained("lenet300", 15)
    tr, va = train_split()
    m = copy.deepcopy(base)
    once(benchmark, lambda: factorize_(m, FactorizeConfig(energy=0.8, finetune=FineTune(epochs=3, augment=0)), tr, va))
    record(
        benchmark,
        ratio=count_params(base) / count_params(m),
        accuracy=evaluate(m, test),
        base_accuracy=evaluate(base, test),
        latency_ms=latency_ms(m, (1, 1, 28, 28), 32),
        eval_name=name,
    )
    assert benchmark.extra_info["compression_ratio"] >= 2.5


@pytest.mark.slow
def test_l1_filter_resnet20(benchmark, eval_sets):
    """Li et al.: ratio 0.5 on ResNet-20 (16/32/64, 32x32): >= 45% fewer MACs, <= 1.5 pt, >= 1.6x faster."""
    test, name = eval_sets[32]
    base = trained("resnet20", 4, size=32, lr=2e-3)
    tr, va = train_split(32)
    m = copy.deepcopy(base)
    once(
        benchmark,
        lambda: prune_(
            m, L1FilterConfig(ratio=0.5, finetune=FineTune(epochs=3, augment=0)), tr, va, input_shape=(1, 1, 32, 32)
        ),
    )
    shape = (1, 1, 32, 32)
    lat_b, lat_a = latency_ms(base, shape, 32, runs=20), latency_ms(m, shape, 32, runs=20)
    record(
        benchmark,
        ratio=count_params(base) / count_params(m),
        accuracy=evaluate(m, test),
        base_accuracy=evaluate(base, test),
        latency_ms=lat_a,
        eval_name=name,
        macs_reduction=round(1 - count_macs(m, shape) / count_macs(base, shape), 4),
        speedup_batch32=round(lat_b / lat_a, 3),
    )
    assert benchmark.extra_info["macs_reduction"] >= 0.45


@pytest.mark.slow
def test_channel_union_resnet20(benchmark, eval_sets):
    """PruneTrain-style: >= 30% fewer params at <= 2 pt drop in <= 4 epochs."""
    test, name = eval_sets[32]
    base = trained("resnet20", 4, size=32, lr=2e-3)
    tr, va = train_split(32)
    m = copy.deepcopy(base)
    once(benchmark, lambda: prune_(m, ChannelUnionConfig(), tr, va, input_shape=(1, 1, 32, 32)))
    shape = (1, 1, 32, 32)
    record(
        benchmark,
        ratio=count_params(base) / count_params(m),
        accuracy=evaluate(m, test),
        base_accuracy=evaluate(base, test),
        latency_ms=latency_ms(m, shape, 32),
        eval_name=name,
        macs_reduction=round(1 - count_macs(m, shape) / count_macs(base, shape), 4),
    )
    assert count_params(m) <= 0.7 * count_params(base)  # >= 30% fewer params


def test_l1_filter_depthwise_and_concat(benchmark):
    """Depthwise-separable and fire (concat) nets: ratio 0.3, no fine-tuning, >= 20% fewer params."""
    rows = {}

    def run():
        for name in ("mobilenet_small", "squeezenet_small"):
            torch.manual_seed(0)
            m = __import__("compress").create_model(name)
            p0 = count_params(m)
            prune_(m, L1FilterConfig(ratio=0.3), input_shape=(1, 1, 32, 32))
            assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
            rows[name] = p0 / count_params(m)

    once(benchmark, run)
    benchmark.extra_info.update(
        compression_ratio=round(min(rows.values()), 3),
        accuracy=None,
        accuracy_drop=None,
        latency_ms=None,
        per_model={k: round(v, 3) for k, v in rows.items()},
    )
    assert min(rows.values()) >= 1 / 0.8


@pytest.mark.slow
def test_l1_filter_resnet50_cpu(benchmark):
    """A real ResNet-50 (pytorchcv, random weights: speed does not depend on them), l1-filter 0.5, batch 32
    at 224x224 on 2 CPU threads: >= 2x faster (issue 13's CPU target)."""
    resnet = pytest.importorskip("pytorchcv.models.resnet")
    from compress.measure import latency_stats
    from compress.method import Context, run

    torch.manual_seed(0)
    base = resnet.resnet50().eval()
    m = copy.deepcopy(base)
    shape = (1, 3, 224, 224)
    once(benchmark, lambda: run("prune", m, L1FilterConfig(ratio=0.5), Context(input_shape=shape)))
    st = latency_stats([base, m], shape, batch=32, runs=3)
    benchmark.extra_info.update(
        compression_ratio=round(count_params(base) / count_params(m), 3),
        accuracy=None,
        accuracy_drop=None,
        latency_ms=round(st[1]["ms"], 1),
        base_latency_ms=round(st[0]["ms"], 1),
        macs_reduction=round(1 - count_macs(m, shape) / count_macs(base, shape), 4),
        speedup_batch32=round(st[0]["ms"] / st[1]["ms"], 3),
    )
    assert benchmark.extra_info["speedup_batch32"] >= 2
