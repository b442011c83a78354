"""--target-macs: where l1-filter lands, and the accuracy after fine-tuning beside Torch-Pruning's own global
pruning at the same MACs (the same fine-tuning for both)."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch

from bench.conftest import VAL_FRACTION, once, trained
from compress import data as data_mod
from compress.config import FineTune
from compress.counting import count_macs
from compress.method import Context, run
from compress.prune import L1FilterConfig
from compress.scoring import evaluate
from compress.train import fit

TARGET = 0.5


def tp_global(model: torch.nn.Module, shape, target: float) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning 1.6's MetaPruner, global pruning by group L1 magnitude, its pruning_ratio bisected until
    the MACs come to ``target`` of the input's: (pruned model, MACs fraction reached)."""
    import torch_pruning as tp

    base = count_macs(model, shape)
    last = [x for x in model.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    names = {m: n for n, m in model.named_modules()}
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        r = (lo + hi) / 2
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pruner.MetaPruner(
                m,
                torch.zeros(shape),
                importance=tp.importance.MagnitudeImportance(p=1),
                global_pruning=True,
                pruning_ratio=r,
                ignored_layers=[dict(m.named_modules())[names[last]]],
            ).step()
        got = count_macs(m, shape) / base
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (m, got)
        lo, hi = (r, hi) if got > target else (lo, r)
    return best


CASES = {  # name: (how to build, input shape, trained on mnist5k?)
    "resnet20 (zoo, trained)": (lambda: trained("resnet20", 4, size=32, lr=2e-3), (1, 1, 32, 32), True),
    "seresnet20 (pytorchcv)": ("pytorchcv.models.seresnet_cifar:seresnet20_cifar10", (1, 3, 32, 32), False),
    "densenet40 (pytorchcv)": ("pytorchcv.models.densenet_cifar:densenet40_k12_cifar10", (1, 3, 32, 32), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_target_macs(benchmark, eval_sets, name):
    build, shape, is_trained = CASES[name]
    if callable(build):
        model = build()
    else:
        mod, fn = build.split(":")
        torch.manual_seed(0)
        model = getattr(importlib.import_module(mod), fn)().eval()
    base = count_macs(model, shape)
    out = {}

    def ours():
        res = run("prune", copy.deepcopy(model), L1FilterConfig(target_macs=TARGET), Context(input_shape=shape))
        out.update(model=res.model, reached=count_macs(res.model, shape) / base)

    once(benchmark, ours)
    theirs, tp_reached = tp_global(model, shape, TARGET)
    info = {
        "target": TARGET,
        "compress_macs_fraction": round(out["reached"], 4),
        "torch_pruning_macs_fraction": round(tp_reached, 4),
    }
    if is_trained:  # the same fine-tuning for both: 2 epochs on the training split
        test, ev = eval_sets[32]
        tr, _ = data_mod.split(data_mod.load("mnist5k?size=32"), VAL_FRACTION)
        info["base_accuracy"] = round(evaluate(model, test), 3)
        for key, m in (("compress", out["model"]), ("torch_pruning", theirs)):
            info[f"{key}_accuracy_before_finetune"] = round(evaluate(m, test), 3)
            fit(m, tr, FineTune(epochs=2, lr=1e-3, augment=2))
            info[f"{key}_accuracy"] = round(evaluate(m, test), 3)
        info["eval_data"] = ev
    benchmark.extra_info.update(case=name, **info)
    assert abs(out["reached"] / TARGET - 1) <= 0.05


CU_CASES = {  # name: (model, input shape, data spec)
    "resnet20 (zoo, trained)": (lambda: trained("resnet20", 4, size=32, lr=2e-3), (1, 1, 32, 32), "mnist5k?size=32"),
    "seresnet20 (pytorchcv)": (
        lambda: _pytorchcv("pytorchcv.models.seresnet_cifar:seresnet20_cifar10"),
        (1, 3, 32, 32),
        "mnist5k?size=32&channels=3",
    ),
}


def _pytorchcv(spec):
    mod, fn = spec.split(":")
    torch.manual_seed(0)
    return getattr(importlib.import_module(mod), fn)()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CU_CASES))
def test_channel_union_target_macs(benchmark, eval_sets, name):
    """channel-union --target-macs 0.5 with its default 4 epochs of regularised training (the pytorchcv model from
    its random weights: the run is its training)."""
    from compress.prune import ChannelUnionConfig

    build, shape, spec = CU_CASES[name]
    model = build()
    tr, va = data_mod.split(data_mod.load(spec), VAL_FRACTION)
    base = count_macs(model, shape)
    out = {}

    def ours():
        res = run(
            "prune",
            copy.deepcopy(model),
            ChannelUnionConfig(target_macs=TARGET),
            Context(train=tr, val=va, input_shape=shape),
        )
        out.update(model=res.model, notes=res.notes, reached=count_macs(res.model, shape) / base)

    once(benchmark, ours)
    test, ev = eval_sets[32]
    if shape[1] == 3:
        from compress.data.core import Mapped

        test = Mapped(test, lambda x: x.repeat(1, 3, 1, 1), test.name)
    benchmark.extra_info.update(
        case=name,
        target=TARGET,
        compress_macs_fraction=round(out["reached"], 4),
        accuracy=round(evaluate(out["model"], test), 3),
        eval_data=ev,
        notes=out["notes"],
    )
    assert abs(out["reached"] / TARGET - 1) <= 0.05


@pytest.mark.slow
def test_target_latency(benchmark):
    """l1-filter --target-latency 0.6 on ResNet-20 (random weights: timing does not depend on them): the fraction
    its bisection measured, and the same model timed again afterwards against the input, interleaved."""
    from compress.measure import latencies
    from compress.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1).eval()  # timed as deployed: BatchNorm in eval mode
    shape = (1, 1, 32, 32)
    out = {}

    def ours():
        res = run("prune", copy.deepcopy(model), L1FilterConfig(target_latency=0.6), Context(input_shape=shape))
        out.update(model=res.model, reached=res.records[0]["reached"])

    once(benchmark, ours)
    a, b = latencies([model, out["model"].eval()], shape)
    lo, med, hi = b["speedup"]["batch_1"]
    again = [round(1 / hi, 3), round(1 / med, 3), round(1 / lo, 3)]
    benchmark.extra_info.update(
        target=0.6,
        bisection_reached=out["reached"],
        timed_again=again,
        macs_fraction=round(count_macs(out["model"], shape) / count_macs(model, shape), 3),
    )
    assert again[1] < 1.0
