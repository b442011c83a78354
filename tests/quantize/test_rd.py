"""Rate-distortion quantization (``rd_lambda``): the level of least (w - c)^2 + λσ²·bits, on a trained LeNet-5."""

import copy
import math

import pytest
import torch

from compress.config import FineTune, Select
from compress.cpz.container import decode_model, encode_model
from compress.cpz.tensors import encode_tensor
from compress.errors import UsageError
from compress.model_io import save_model
from compress.prune import ThresholdConfig, prune_
from compress.quant_state import get_state
from compress.quantize import QuantConfig, quantize_, quantize_tensor
from compress.quantize.rd import MAX_RD_LAMBDA, empirical_entropy, entropy_rates, rd_assign
from compress.recipe import Recipe, Stage


def _brute(values, levels, rates, mu):
    cost = (values[:, None].double() - levels[None, :].double()) ** 2 + mu * rates[None, :].double()
    return cost.argmin(1)


def test_rd_assign_is_the_least_cost_level():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        levels = torch.randn(9, generator=g).sort().values.double()
        rates = torch.rand(9, generator=g).double() * 5
        values = torch.randn(500, generator=g).double() * 1.5
        for mu in (0.0, 0.01, 0.3, 3.0):
            got = rd_assign(values, levels, rates, mu)
            want = _brute(values, levels, rates, mu)
            # the same level, or one of equal cost (a tie exactly at a break)
            cost = (values[:, None] - levels[None, :]) ** 2 + mu * rates[None, :]
            assert torch.allclose(cost.gather(1, got[:, None]), cost.gather(1, want[:, None]), rtol=0, atol=1e-12)
    # an unused level (infinite rate) is never chosen
    rates = entropy_rates(torch.tensor([5, 0, 5]))
    assert math.isinf(float(rates[1]))
    assert 1 not in rd_assign(torch.linspace(-1, 1, 101), torch.tensor([-1.0, 0.0, 1.0]), rates, 0.01).tolist()


def _layer(model, name="conv2"):
    return dict(model.named_modules())[name].weight.detach().clone()


def test_lambda_zero_is_nearest_level(lenet5_trained):
    """λ = 0 is today's quantizer: every weight on its nearest codebook value or grid point."""
    w = _layer(lenet5_trained)
    st = quantize_tensor(w, 4, "kmeans", rd_lambda=0.0)
    cb, codes = st.codebook.double(), st.codes.flatten().long()
    assert len(cb) == 16
    nearest = (w.flatten().double()[:, None] - cb[None, :]).abs().argmin(1)
    assert torch.equal(codes, nearest)
    st = quantize_tensor(w, 4, "minmax", rd_lambda=0.0)
    q = torch.round(w.flatten(1).double() / st.scale.double()[:, None]).clamp(-7, 7)
    assert torch.equal(st.codes.long() - 7, q.long())


@pytest.mark.parametrize("scheme,bits", [("kmeans", 4), ("kmeans", 3), ("mmse", 4)])
def test_lambda_trades_entropy_for_distortion(lenet5_trained, scheme, bits):
    """On a trained layer, a larger λ lowers the codes' entropy and the coded bytes and raises the squared error."""
    w = _layer(lenet5_trained)
    rows = []
    for lam in (0.0, 0.03, 0.1, 0.3):
        st = quantize_tensor(w, bits, scheme, rd_lambda=lam)
        dq = st.dequantize(w.shape)
        codes = st.codes.flatten().long()
        live = codes >= 0 if st.is_codebook else dq.flatten() != 0
        nbytes = len(encode_tensor(dq, st)[0])
        rows.append((lam, empirical_entropy(codes[live], 257), float((w - dq).pow(2).mean()), nbytes))
    for a, b in zip(rows, rows[1:], strict=False):
        assert b[1] < a[1] and b[2] > a[2] and b[3] <= a[3], rows
    assert rows[-1][3] < rows[0][3], rows


@pytest.mark.parametrize("scheme", ["kmeans", "minmax"])
def test_pruned_zeros_stay_zero(lenet5_trained, scheme):
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity=0.6, rounds=1, finetune=FineTune(epochs=0)))
    zero = {n: mod.weight == 0 for n, mod in m.named_modules() if hasattr(mod, "weight")}
    quantize_(m, QuantConfig(bits=3, scheme=scheme, rd_lambda=0.3))
    for n, mod in m.named_modules():
        st = get_state(mod)
        if st is None:
            continue
        st.check(mod.weight, n)
        assert bool((mod.weight[zero[n]] == 0).all())
        if scheme == "kmeans":  # a codebook has no zero: exactly the pruned weights are code -1
            assert torch.equal(st.codes.flatten() < 0, zero[n].flatten())
    back = decode_model(encode_model(m)[0])  # codebooks of fewer than 2^bits values: the file round-trips
    for (n, a), b in zip(m.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_fine_tuning_keeps_the_rd_assignment(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    layers = Select(names=("conv1", "conv2", "fc2"), spare_first_last=False)  # (fc1's 400k weights: time)
    fit_only = copy.deepcopy(lenet5_trained)
    quantize_(fit_only, QuantConfig(bits=3, scheme="kmeans", rd_lambda=0.1, select=layers))
    tuned = copy.deepcopy(lenet5_trained)
    ft = FineTune(epochs=0.5, lr=1e-3)
    quantize_(
        tuned,
        QuantConfig(bits=3, scheme="kmeans", rd_lambda=0.1, select=layers, finetune=ft),
        train_data=tr.subset(range(256)),
    )
    moved = 0
    for n in ("conv1", "conv2", "fc2"):
        a, b = get_state(getattr(fit_only, n)), get_state(getattr(tuned, n))
        assert torch.equal(a.codes, b.codes), n  # the same level for every weight
        assert len(a.codebook) == len(b.codebook) and len(a.codebook) < 8, n  # ECVQ emptied some levels
        moved += int((a.codebook != b.codebook).sum())
        b.check(getattr(tuned, n).weight, n)
    assert moved > 0  # the centroids did train


@pytest.mark.parametrize(
    "value,said",
    [
        (-0.1, f"rd_lambda must be in [0, {MAX_RD_LAMBDA:g}], got -0.1"),
        (11, f"rd_lambda must be in [0, {MAX_RD_LAMBDA:g}], got 11"),
        (float("nan"), "rd_lambda must be a number"),
        (float("inf"), "rd_lambda must be a number"),
        ("0.1", "rd_lambda must be a number"),
        (True, "rd_lambda must be a number"),
    ],
)
def test_recipe_refuses_bad_lambda(value, said):
    stage = {"method": "quantize", "scheme": "kmeans", "bits": 4, "rd_lambda": value}
    with pytest.raises(UsageError) as e:
        Recipe.from_dict({"stage": [stage]})
    assert said in str(e.value) and "\n" not in str(e.value)


def test_recipe_refuses_lambda_for_a_scheme_without_it():
    with pytest.raises(UsageError, match="scheme 'pow2' has no rate-distortion assignment"):
        Recipe.from_dict({"stage": [{"method": "quantize", "scheme": "pow2", "bits": 4, "rd_lambda": 0.1}]})


def test_recipe_searches_bits_and_lambda_together():
    rec = Recipe.from_dict(
        {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": [4, 3], "rd_lambda": [0, 0.1, 0.3]}]}
    )
    st = rec.stages[0]
    assert [(c.bits, c.rd_lambda) for c in st.candidates] == [(b, x) for b in (4, 3) for x in (0, 0.1, 0.3)]
    assert st.search_key == "bits, rd_lambda" and st.value(st.candidates[1]) == {"bits": 4, "rd_lambda": 0.1}
    assert Stage.from_dict(st.to_dict()) == st and Recipe.from_dict(rec.to_dict()) == rec
    one = Recipe.from_dict({"stage": [{"method": "quantize", "bits": 4, "rd_lambda": [0.0, 0.1]}]}).stages[0]
    assert one.search_key == "rd_lambda" and one.value(one.candidates[1]) == 0.1
    with pytest.raises(UsageError, match="make 72 candidates; at most 64"):
        Recipe.from_dict({"stage": [{"method": "quantize", "bits": [2, 3, 4, 5, 6, 7, 8, 8], "rd_lambda": [0.0] * 9}]})


def test_cli_rd_lambda(cli, tmp_path, lenet5_trained):
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    res = cli("quantize", tmp_path / "m.pt", "--bits", "3", "--scheme", "kmeans", "--rd-lambda", "0.1", "--layers",
              "conv*", "-o", tmp_path / "q.cpz", "--no-latency")  # fmt: skip
    assert res.code == 0, res.err
    assert "code entropy" in res.out
    for args, said in [
        (["--rd-lambda", "-1"], "rd_lambda must be in [0, 10]"),
        (["--rd-lambda", "0.1", "--scheme", "pow2"], "has no rate-distortion assignment"),
    ]:
        res = cli("quantize", tmp_path / "m.pt", "--bits", "3", *args, "-o", tmp_path / "r.pt")
        assert res.code == 2 and said in res.err and len(res.err.strip().splitlines()) == 1, res.err
