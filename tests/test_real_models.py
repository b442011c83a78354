"""Structural pruning on architectures nobody here wrote (pytorchcv, pure PyTorch): dense
concatenation, squeeze-excitation, inverted residuals with depthwise convs, grouped convs, channel
shuffle. Each either prunes into a working, smaller model or refuses in one line naming why."""
import copy
import importlib

import pytest
import torch

from compress.errors import InputError
from compress.metrics import count_macs
from compress.prune import L1FilterConfig
from compress.stages import Context, run

pytest.importorskip("pytorchcv", reason="installed by `make install` (pip install --no-deps pytorchcv)")

FAMILIES = {  # name: (pytorchcv module, input size, what it exercises)
    "densenet40_k12_cifar10": ("densenet_cifar", 32, "dense concatenation"),
    "seresnet20_cifar10": ("seresnet_cifar", 32, "squeeze-excitation, residual"),
    "mobilenetv2_wd2": ("mobilenetv2", 224, "inverted residual, depthwise"),
    "resnext14_16x4d": ("resnext", 224, "grouped convs"),
    "regnetx002": ("regnet", 224, "grouped convs, residual"),
}


def _model(name):
    torch.manual_seed(0)
    mod, size, _ = FAMILIES.get(name, ("shufflenetv2", 224, ""))
    return getattr(importlib.import_module(f"pytorchcv.models.{mod}"), name)().eval(), (1, 3, size, size)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_l1_filter_prunes_real_architectures(name):
    m, shape = _model(name)
    x = torch.randn(2, *shape[1:])
    macs0 = count_macs(m, shape)
    res = run("prune", m, L1FilterConfig(ratio=0.5), Context(input_shape=shape))
    macs1 = count_macs(res.model, shape)
    assert macs0 / macs1 > 3.0, (name, macs0 / macs1)  # as torch-pruning's own MetaPruner at 0.5
    assert res.model(x).shape == (2, 1000 if shape[-1] == 224 else 10)
    for mod in res.model.modules():  # grouped convs lost the same positions in every group
        if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1:
            assert mod.in_channels % mod.groups == 0 and mod.out_channels % mod.groups == 0


def test_densenet_concat_indices_stay_in_step():
    """Concatenation consumers are scored on the model as it is after earlier groups were pruned
    (collected-then-pruned groups used to index past them: IndexError)."""
    m, shape = _model("densenet40_k12_cifar10")
    before = copy.deepcopy(m)
    run("prune", m, L1FilterConfig(ratio=0.3), Context(input_shape=shape))
    assert count_macs(m, shape) < count_macs(before, shape)


def test_channel_shuffle_is_refused_in_one_line():
    m, shape = _model("shufflenetv2_wd2")
    w = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(InputError, match="torch-pruning failed tracing"):
        run("prune", m, L1FilterConfig(ratio=0.5), Context(input_shape=shape))
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters()))  # nothing was changed


def test_a_prune_that_would_break_the_model_leaves_it_unchanged():
    """A concatenation flattened straight into a Linear: each channel is H x W of its inputs, which
    torch-pruning does not follow. The model must come back unchanged, with a one-line reason."""
    import torch.nn as nn

    class Fire(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3)
            self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(16 * 26 * 26, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.fc(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1).flatten(1))

    torch.manual_seed(0)
    m = Fire()
    x = torch.randn(2, 1, 28, 28)
    y = m(x)
    with pytest.raises(InputError, match="left unchanged"):
        run("prune", m, L1FilterConfig(ratio=0.5), Context(input_shape=(1, 1, 28, 28)))
    assert torch.equal(m(x), y) and m.fc.in_features == 16 * 26 * 26


CHAIN = {  # --arch callables of real architectures whose classes are neither torch.nn nor compress ones
    "resnet20": "pytorchcv.models.resnet_cifar:resnet20_cifar10",
    "seresnet20": "pytorchcv.models.seresnet_cifar:seresnet20_cifar10",
    "densenet40": "pytorchcv.models.densenet_cifar:densenet40_k12_cifar10",
}


@pytest.mark.parametrize("name", list(CHAIN))
def test_a_users_own_classes_go_through_every_command_without_trust(name, tmp_path, cli):
    """state_dict + --arch in; prune -> quantize -> encode -> decode -> report, each reading the last
    one's file with the same --arch and never --trust-pickle; the decoded model computes exactly what
    the quantized one did. Files hold the structure and weights as data, never the user's classes."""
    from compress.formats import load_model

    arch = CHAIN[name]
    mod, fn = arch.split(":")
    torch.manual_seed(0)
    torch.save(getattr(importlib.import_module(mod), fn)().state_dict(), tmp_path / "in.pt")
    steps = [["prune", tmp_path / "in.pt", "--method", "l1-filter", "--ratio", "0.3", "-o", tmp_path / "p.pt"],
             ["quantize", tmp_path / "p.pt", "--bits", "4", "--scheme", "kmeans", "-o", tmp_path / "q.pt"],
             ["encode", tmp_path / "q.pt", "-o", tmp_path / "q.cpz"],
             ["decode", tmp_path / "q.cpz", "-o", tmp_path / "d.pt"],
             ["report", tmp_path / "d.pt"]]
    for args in steps:
        res = cli("-q", *args, "--arch", arch, *(["--input-shape", "1,3,32,32"] if args[0] != "encode" and
                                                 args[0] != "decode" else []))
        assert res.code == 0, (args[0], res.err)
    without = cli("-q", "report", tmp_path / "q.cpz")
    assert without.code != 0 and f"--arch {arch}" in without.err and "Traceback" not in without.err
    x = torch.randn(2, 3, 32, 32)
    q, d = load_model(tmp_path / "q.pt", arch=arch).eval(), load_model(tmp_path / "d.pt", arch=arch).eval()
    assert torch.equal(q(x), d(x))
    assert sum(p.numel() for p in q.parameters()) < 0.8 * sum(
        p.numel() for p in getattr(importlib.import_module(mod), fn)().parameters())
    for f in ("p.pt", "q.pt", "d.pt"):  # plain data: torch's safe loader reads it, nothing is unpickled
        assert set(torch.load(tmp_path / f, weights_only=True)) == {"compress_cpz", "state_dict"}


MATRIX = {  # family: (--arch callable, input size, what it exercises)
    "resnet20": ("pytorchcv.models.resnet_cifar:resnet20_cifar10", 32, "residual"),
    "seresnet20": ("pytorchcv.models.seresnet_cifar:seresnet20_cifar10", 32, "squeeze-excitation"),
    "densenet40": ("pytorchcv.models.densenet_cifar:densenet40_k12_cifar10", 32, "dense concatenation"),
    "mobilenetv2": ("pytorchcv.models.mobilenetv2:mobilenetv2_wd4", 224, "inverted residual, depthwise"),
    "shufflenetv2": ("pytorchcv.models.shufflenetv2:shufflenetv2_wd2", 224, "channel shuffle, grouped"),
}


@pytest.mark.parametrize("family", list(MATRIX))
def test_every_method_on_real_families(family, tmp_path):
    """report numbers, threshold pruning, INT8 and 4-bit k-means, the .cpz round trip (bit-exact, rebuilt
    from the user's code), SVD factorization and ONNX INT8 export, on models of classes nobody here wrote."""
    from compress.coding.container import decode_model, encode_model
    from compress.data import Dataset
    from compress.export import export
    from compress.factorize import FactorizeConfig
    from compress.formats import arch_base
    from compress.metrics import count_nonzero, count_params
    from compress.prune import ThresholdConfig
    from compress.quantize import QuantConfig

    arch, size, _ = MATRIX[family]
    base = arch_base(arch)
    shape, x = (1, 3, size, size), torch.randn(4, 3, size, size)
    m = base().eval()
    assert count_macs(m, shape) > 0 and count_params(m) > 0
    run("prune", m, ThresholdConfig(sparsity=0.6, steps=1), Context(input_shape=shape))
    assert count_nonzero(m) < 0.5 * count_params(m)
    for cfg in (QuantConfig(bits=8), QuantConfig(bits=4, scheme="kmeans")):
        q = copy.deepcopy(m)
        run("quantize", q, cfg, Context(input_shape=shape))
        d = decode_model(encode_model(copy.deepcopy(q))[0], base=base).eval()
        assert torch.equal(q.eval()(x), d(x)), cfg.scheme
    f = base().eval()
    run("factorize", f, FactorizeConfig(rank_ratio=0.5), Context(input_shape=shape))
    assert count_params(f) < count_params(base()) and f(x).shape[0] == 4
    calib = Dataset(torch.randn(16, *shape[1:]), torch.zeros(16, dtype=torch.long))
    res = export(base().eval(), tmp_path / "m.onnx", shape, int8=True, calib_data=calib)
    assert res["max_rel_diff"] < 1e-4 and (tmp_path / "m.onnx").stat().st_size < 0.5 * 4 * count_params(base())
