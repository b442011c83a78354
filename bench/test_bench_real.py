"""Issue 13's matrix as numbers: real architectures nobody here wrote (pytorchcv, and ConvNeXt in
torchvision's layout), random weights (structure and bytes do not depend on them), through
l1-filter pruning beside torch-pruning's own pruner, 4-bit k-means, and the .cpz with its
torch.export graph decoded without the model's code (outputs compared with the quantized model's)."""

from __future__ import annotations

import copy
import importlib
import time
import warnings

import pytest
import torch

from bench.conftest import once

FAMILIES = {  # name: (callable, input size, what it exercises)
    "resnet20": ("pytorchcv.models.resnet_cifar:resnet20_cifar10", 32, "residual"),
    "seresnet20": ("pytorchcv.models.seresnet_cifar:seresnet20_cifar10", 32, "squeeze-excitation"),
    "densenet40": ("pytorchcv.models.densenet_cifar:densenet40_k12_cifar10", 32, "dense concatenation"),
    "mobilenetv2_wd2": ("pytorchcv.models.mobilenetv2:mobilenetv2_wd2", 224, "inverted residual"),
    "shufflenetv2_wd2": ("pytorchcv.models.shufflenetv2:shufflenetv2_wd2", 224, "channel shuffle"),
    "resnext14_16x4d": ("pytorchcv.models.resnext:resnext14_16x4d", 224, "grouped convs"),
    "regnetx002": ("pytorchcv.models.regnet:regnetx002", 224, "grouped convs, residual"),
    "efficientnet_b0": ("pytorchcv.models.efficientnet:efficientnet_b0", 224, "SE, depthwise"),
    "convnext_mini": ("tests.archs:convnext_mini", 64, "channels-last LayerNorm, Linear MLP"),
    "tiny_vit": ("tests.archs:tiny_vit", 32, "patch conv, MultiheadAttention"),
}


# torchvision's own models where torchvision imports (the device tool's GPU image; not beside the CPU
# build of torch 2.13 here)
TORCHVISION = {
    "tv_resnet18": ("torchvision.models:resnet18", 224, "residual (torchvision)"),
    "tv_mobilenet_v3_small": ("torchvision.models:mobilenet_v3_small", 224, "SE, hardswish (torchvision)"),
    "tv_efficientnet_b0": ("torchvision.models:efficientnet_b0", 224, "SE, stochastic depth (torchvision)"),
    "tv_densenet121": ("torchvision.models:densenet121", 224, "dense concatenation (torchvision)"),
    "tv_regnet_x_400mf": ("torchvision.models:regnet_x_400mf", 224, "grouped convs (torchvision)"),
    "tv_shufflenet_v2_x0_5": ("torchvision.models:shufflenet_v2_x0_5", 224, "inline channel shuffle (torchvision)"),
    "tv_squeezenet1_1": ("torchvision.models:squeezenet1_1", 224, "fire concatenation (torchvision)"),
    "tv_convnext_tiny": ("torchvision.models:convnext_tiny", 224, "ConvNeXt (torchvision)"),
}
try:
    import torchvision  # noqa: F401

    FAMILIES.update(TORCHVISION)
except Exception:  # absent, or its compiled ops do not load beside this torch
    pass


def _build(spec):
    mod, fn = spec.split(":")
    torch.manual_seed(0)
    return getattr(importlib.import_module(mod), fn)().eval()


def _tp_macs_ratio(model, shape):
    import torch_pruning as tp

    from compress.counting import count_macs

    m = copy.deepcopy(model)
    last = [x for x in m.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pruner.MetaPruner(
                m,
                torch.zeros(shape),
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=0.5,
                ignored_layers=[last],
            ).step()
        return round(count_macs(model, shape) / count_macs(m, shape), 2)
    except Exception as e:  # torch-pruning 1.6 fails on channel shuffle
        return f"fails ({type(e).__name__})"


def _row(name):
    from compress.counting import count_macs, count_params
    from compress.cpz.container import decode_model, encode_model
    from compress.meta import set_meta
    from compress.method import Context, run
    from compress.prune import L1FilterConfig
    from compress.quantize import QuantConfig

    spec, size, what = FAMILIES[name]
    shape = (1, 3, size, size)
    base = _build(spec)
    macs0, params0 = count_macs(base, shape), count_params(base)
    pruned = copy.deepcopy(base)
    t0 = time.perf_counter()
    res = run("prune", pruned, L1FilterConfig(ratio=0.5), Context(input_shape=shape))
    prune_s = time.perf_counter() - t0
    q = copy.deepcopy(pruned)
    run("quantize", q, QuantConfig(bits=4, scheme="kmeans"), Context(input_shape=shape))
    set_meta(q, input_shape=list(shape))
    blob, stats = encode_model(copy.deepcopy(q), graph=True)
    x = torch.randn(2, *shape[1:])
    t0 = time.perf_counter()
    d = decode_model(blob)  # from the graph: no --arch
    decode_s = time.perf_counter() - t0
    with torch.no_grad():  # 0 for convnets; attention's fused eager kernel differs from its graph in the last bit
        diff = float((d(x) - q(x)).abs().max() / q(x).abs().max())
    return {
        "family": name,
        "exercises": what,
        "params": params0,
        "macs": macs0,
        "l1_macs_ratio": round(macs0 / count_macs(pruned, shape), 2),
        "tp_macs_ratio": _tp_macs_ratio(base, shape),
        "kept_groups": sum(n.startswith("kept ") for n in res.notes),
        "prune_s": round(prune_s, 2),
        "cpz_bytes": stats["file_bytes"],
        "graph_bytes": stats["graph_bytes"],
        "decode_s": round(decode_s, 3),
        "ratio_vs_dense": round(4 * params0 / stats["file_bytes"], 1),
        "graph_decode_rel_diff": diff,
    }


@pytest.mark.slow
def test_real_architecture_matrix(benchmark):
    pytest.importorskip("pytorchcv")
    rows = []
    once(benchmark, lambda: rows.extend(_row(n) for n in FAMILIES))
    benchmark.extra_info.update(matrix=rows, compression_ratio=None, accuracy=None, accuracy_drop=None, latency_ms=None)
    for r in rows:
        assert r["graph_decode_rel_diff"] < 1e-5, r
        assert r["l1_macs_ratio"] > 1.5, r
        if isinstance(r["tp_macs_ratio"], float):  # at least what torch-pruning's own pruner cuts
            assert r["l1_macs_ratio"] >= 0.99 * r["tp_macs_ratio"], r
