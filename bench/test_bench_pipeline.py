"""Pipelines end to end, the peer baseline beside them, INT8 execution and decoder speed."""

from __future__ import annotations

import copy
import gzip
import io
import time
import warnings
import zlib

import pytest
import torch
import torch.nn as nn

from bench.conftest import VAL_FRACTION, once, record, train_split, trained
from compress.config import FineTune
from compress.counting import count_params
from compress.cpz.container import load_cpz, save_cpz
from compress.measure import latency_ms
from compress.scoring import evaluate
from compress.train import fit


def peer_baseline(base: nn.Module, sparsity: float = 0.92, epochs: float = 8):
    """What a user would do with plain PyTorch: global magnitude pruning (torch.nn.utils.prune) with
    fine-tuning, dynamic INT8 quantization of the Linear layers, gzip of the state_dict."""
    import torch.nn.utils.prune as tprune
    from torch.ao.quantization import quantize_dynamic

    m = copy.deepcopy(base)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    tr, _ = train_split()
    fit(m, tr, FineTune(epochs=epochs, lr=1e-3, augment=2))  # torch's masks hold through its pre-hooks
    for mod, n in params:
        tprune.remove(mod, n)
    with warnings.catch_warnings():  # torch.ao's eager quantization announces its move to torchao; the peer uses it
        warnings.simplefilter("ignore", DeprecationWarning)
        q = quantize_dynamic(m.eval(), {nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    return q, len(gzip.compress(buf.getvalue(), 9))


@pytest.mark.parametrize("name", ["lenet5", "lenet300"])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # the peer's quantized tensors
def test_peer_baseline(benchmark, eval_sets, name):
    test, ev = eval_sets[28]
    base = trained(name, 15)
    out = {}
    once(benchmark, lambda: out.update(zip(("model", "bytes"), peer_baseline(base), strict=False)))
    record(
        benchmark,
        ratio=4 * count_params(base) / out["bytes"],
        accuracy=evaluate(out["model"], test),
        base_accuracy=evaluate(base, test),
        latency_ms=latency_ms(out["model"], (1, 1, 28, 28), 32),
        eval_name=ev,
        file_bytes=out["bytes"],
        method="torch prune + dynamic int8 + gzip",
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "lenet300"])
def test_pipeline_deep_compression(benchmark, eval_sets, name, tmp_path):
    """compress pipeline, default recipe, 0.5 pt budget on the held-out split: >= 40x (Han: 39x / 40x)."""
    from compress.search import pipeline

    test, ev = eval_sets[28]
    base = trained(name, 15)
    from compress import data as data_mod

    ds = data_mod.load("mnist5k")
    out = {}

    def run():
        m, summary = pipeline(copy.deepcopy(base), ds, max_accuracy_drop=0.5, val_fraction=VAL_FRACTION)
        stats = save_cpz(m, tmp_path / "m.cpz")
        out.update(model=m, summary=summary, bytes=stats["file_bytes"])

    once(benchmark, run)
    d = load_cpz(tmp_path / "m.cpz")
    record(
        benchmark,
        ratio=4 * count_params(base) / out["bytes"],
        accuracy=evaluate(d, test),
        base_accuracy=evaluate(base, test),
        latency_ms=latency_ms(d, (1, 1, 28, 28), 32),
        eval_name=ev,
        file_bytes=out["bytes"],
        kept=[s.kept.options if s.kept else None for s in out["summary"].stages],
    )
    assert benchmark.extra_info["compression_ratio"] >= 100


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet5", "lenet300", "resnet20"])
def test_nncodec_peer(benchmark, eval_sets, name, tmp_path):
    """The .cpz (default pipeline; the same with rate-distortion quantization; the context-adaptive coder
    when the container has one) beside NNCodec (MPEG NNR / DeepCABAC) at several qp on the default .cpz's
    weights, at equal test accuracy (bench/nncodec_side.py). NNCodec's own environment: NNCODEC_PYTHON
    (``make nncodec-env``)."""
    import os
    import sys

    from bench.nncodec_side import MODELS, side_by_side

    py = os.environ.get("NNCODEC_PYTHON")
    if not py:
        pytest.skip("set NNCODEC_PYTHON to a Python with nncodec (make nncodec-env)")
    test, ev = eval_sets[MODELS[name][1]]
    out = {}
    once(benchmark, lambda: out.update(side_by_side(name, test, py, tmp_path)))
    cpz = out["cpz"][0]
    record(
        benchmark,
        ratio=1.0,
        accuracy=cpz["accuracy"],
        base_accuracy=out["base_accuracy"],
        latency_ms=0.0,
        eval_name=ev,
        side=out,
        python=sys.version.split()[0],
    )


@pytest.mark.slow
def test_ort_int8_resnet20(benchmark, eval_sets, tmp_path):
    """ONNX Runtime static INT8 vs FP32 ONNX at batch 32 on 2 threads: >= 1.5x faster, <= 0.5 pt."""
    from compress import data as data_mod
    from compress.export import _session, onnx_accuracy, onnx_latency_ms, quantize_int8, to_onnx

    test, ev = eval_sets[32]
    base = trained("resnet20", 4, size=32, lr=2e-3)
    shape = (1, 1, 32, 32)
    to_onnx(base, tmp_path / "fp32.onnx", shape)
    calib = data_mod.load("mnist5k?size=32&limit=512")
    once(benchmark, lambda: quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib))
    s32, s8 = _session(tmp_path / "fp32.onnx", 2), _session(tmp_path / "int8.onnx", 2)
    t32, t8 = onnx_latency_ms(s32, shape, 32, runs=30), onnx_latency_ms(s8, shape, 32, runs=30)
    a32, a8 = onnx_accuracy(s32, test), onnx_accuracy(s8, test)
    record(
        benchmark,
        ratio=(tmp_path / "fp32.onnx").stat().st_size / (tmp_path / "int8.onnx").stat().st_size,
        accuracy=a8,
        base_accuracy=a32,
        latency_ms=t8,
        eval_name=ev,
        fp32_latency_ms=round(t32, 4),
        speedup_batch32=round(t32 / t8, 3),
    )
    assert benchmark.extra_info["speedup_batch32"] >= 1.5


def test_decode_speed_vs_zlib(benchmark, tmp_path):
    """load_cpz of a 4.2 M-weight INT4 k-means model vs zlib decompressing the same count of bytes: the default
    file (``coder="auto"``: Huffman for a stream this long), and beside it ANS-coded (``coder="context"``,
    compress/coding/arith.py)."""
    from compress.coding.packing import pack
    from compress.quant_state import get_state
    from compress.quantize import QuantConfig, quantize_

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2048, 2048, bias=False))
    with torch.no_grad():  # trained weights are roughly Laplace-distributed, not uniform
        m[0].weight.copy_(torch.distributions.Laplace(0.0, 0.02).sample((2048, 2048)))
    quantize_(m, QuantConfig(bits=4, scheme="kmeans"))
    save_cpz(m, tmp_path / "big.cpz")  # the default coder
    size = (tmp_path / "big.cpz").stat().st_size
    save_cpz(m, tmp_path / "ans.cpz", coder="context")
    t_ans = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        load_cpz(tmp_path / "ans.cpz")
        t_ans = min(t_ans, time.perf_counter() - t0)
    # zlib on the same content: the model's INT4 codes, packed two to a byte, deflated
    z = zlib.compress(pack(get_state(m[0]).codes.flatten().clamp_min(0).numpy(), 4), 6)
    t_zlib = float("inf")  # both sides: the best of several runs (least disturbed by the machine)
    for _ in range(10):
        t0 = time.perf_counter()
        zlib.decompress(z)
        t_zlib = min(t_zlib, time.perf_counter() - t0)
    d = benchmark.pedantic(load_cpz, args=(tmp_path / "big.cpz",), rounds=7, iterations=1, warmup_rounds=1)
    assert torch.equal(d[0].weight, m[0].weight)
    t_cpz = benchmark.stats.stats.min
    benchmark.extra_info.update(
        compression_ratio=round(4 * 2048 * 2048 / size, 3),
        accuracy=None,
        accuracy_drop=None,
        latency_ms=round(t_cpz * 1000, 3),
        zlib_ms=round(t_zlib * 1000, 3),
        times_zlib=round(t_cpz / t_zlib, 2),
        weights=2048 * 2048,
        mweights_per_s=round(2048 * 2048 / t_cpz / 1e6, 1),
        cpz_bytes=size,
        zlib_bytes=len(z),
        ans_ms=round(t_ans * 1000, 3),
        ans_times_huffman=round(t_ans / t_cpz, 2),
        ans_bytes=(tmp_path / "ans.cpz").stat().st_size,
    )
    assert t_cpz <= 3 * t_zlib
    assert t_ans <= 5 * t_cpz  # the ANS decoder: one library call per chunk of doubling length
