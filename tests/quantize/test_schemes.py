"""Quantization schemes are a registry: the built-in power-of-two scheme, and one a user registers."""

import copy

import pytest
import torch

from compress.config import FineTune
from compress.cpz.container import decode_model, encode_model
from compress.errors import FormatError
from compress.prune import ThresholdConfig, prune_
from compress.quant_state import SCHEMES, QuantState, Scheme, get_state, register_scheme
from compress.quantize import QuantConfig, quantize_, sqnr_db
from compress.quantize.pow2 import MAX_EXPONENTS


def _pow2_ok(w, state):
    """Every nonzero is ±s·2^-i for one s and i < n; the table holds exactly those values."""
    cb = state.codebook
    s = float(cb.abs().max())
    n = min(2 ** (state.bits - 1), MAX_EXPONENTS)
    expected = torch.cat([-s * 2.0 ** -torch.arange(n), (s * 2.0 ** -torch.arange(n)).flip(0)])
    assert torch.equal(cb, expected.float())
    nz = w[w != 0]
    mant, exp = torch.frexp(nz.abs() / s)  # |w| / s = 0.5 * 2^exp exactly: a power of two
    assert bool((mant == 0.5).all()) and int(exp.max()) <= 1 and int(exp.min()) > 1 - n


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_pow2_weights_are_signed_powers_of_two(lenet5_trained, bits):
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity=0.5, rounds=1, finetune=FineTune(epochs=0)))
    zeros = {n: p == 0 for n, p in m.named_parameters() if n.endswith("weight")}
    quantize_(m, QuantConfig(bits=bits, scheme="pow2"))
    for name, mod in m.named_modules():
        state = get_state(mod)
        if state is None:
            continue
        assert state.scheme == "pow2" and state.is_codebook
        state.check(mod.weight, name)
        _pow2_ok(mod.weight.detach(), state)
        assert bool((mod.weight[zeros[f"{name}.weight"]] == 0).all())  # pruned weights stay zero


def test_pow2_scale_is_the_least_error_one(lenet5_trained):
    """The chosen scale is no worse than the largest magnitude (the naive choice), and more bits help."""
    from compress.quantize.pow2 import quantize_pow2, table

    w = lenet5_trained.fc1.weight.detach()
    errs = {}
    for bits in (3, 4, 5):
        codes, tab = quantize_pow2(w, bits)
        dq = torch.where(codes >= 0, tab[codes.long().clamp_min(0)], torch.zeros(())).view_as(w)
        naive = table(float(w.abs().max()), min(2 ** (bits - 1), MAX_EXPONENTS)).double()
        full = torch.cat([naive[: len(naive) // 2], torch.zeros(1, dtype=torch.float64), naive[len(naive) // 2 :]])
        nearest = full[(w.flatten().double()[:, None] - full[None]).abs().argmin(1)]
        errs[bits] = float((w - dq).pow(2).sum())
        assert errs[bits] <= float((w.flatten().double() - nearest).pow(2).sum()) * 1.001
    assert errs[5] < errs[4] < errs[3]


def test_pow2_travels_through_the_container_by_name(lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=4, scheme="pow2"))
    blob, _ = encode_model(m)
    d = decode_model(blob)
    assert get_state(d.fc1).scheme == "pow2" and get_state(d.conv1).scheme == "pow2"
    assert torch.equal(d.fc1.weight, m.fc1.weight)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(d(x), m(x))


def test_codebook_schemes_refuse_grid_options():
    for name, s in SCHEMES.items():
        if s.storage == "codebook":
            with pytest.raises(ValueError, match="grid schemes only"):
                QuantConfig(scheme=name, per_channel=False)


def test_unknown_scheme_is_refused_with_the_known_ones(cli, tmp_path, lenet5_trained):
    with pytest.raises(ValueError, match="pow2"):
        QuantConfig(scheme="log")
    from compress.model_io import save_model

    save_model(lenet5_trained, tmp_path / "m.pt")
    res = cli("quantize", tmp_path / "m.pt", "--scheme", "log", "-o", tmp_path / "q.pt")
    assert res.code == 2 and "minmax" in res.err and "pow2" in res.err
    assert not (tmp_path / "q.pt").exists()


@pytest.fixture
def ternary():
    """A user's scheme in a few lines: weights -t, 0, +t per layer (a codebook of two values)."""

    @register_scheme
    class Ternary(Scheme):
        name = "ternary-test"
        storage = "codebook"

        def fit(self, w, bits, per_channel=True, symmetric=True):
            t = float(w.abs().mean())
            codes = torch.full((w.numel(),), -1, dtype=torch.int16)
            flat = w.flatten()
            codes[flat > t / 2] = 1
            codes[flat < -t / 2] = 0
            return QuantState(bits, self.name, codes, codebook=torch.tensor([-t, t]))

    yield Ternary
    del SCHEMES["ternary-test"]


def test_a_registered_scheme_needs_no_other_change(lenet5_trained, ternary, tmp_path):
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=2, scheme="ternary-test", bias_bits=None))
    assert len(torch.unique(m.fc1.weight)) == 3
    assert sqnr_db(lenet5_trained.fc1.weight.detach(), m.fc1.weight.detach()) > 0
    blob, _ = encode_model(m)
    d = decode_model(blob)
    assert get_state(d.fc2).scheme == "ternary-test" and torch.equal(d.fc2.weight, m.fc2.weight)
    del SCHEMES["ternary-test"]  # a compress that does not know the scheme refuses the file by name
    try:
        with pytest.raises(FormatError, match="ternary-test"):
            decode_model(blob)
    finally:
        SCHEMES["ternary-test"] = ternary()


def test_register_scheme_checks_what_it_is_given():
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(type("Again", (Scheme,), {"name": "kmeans", "storage": "codebook"}))
    with pytest.raises(ValueError, match="storage"):
        register_scheme(type("Odd", (Scheme,), {"name": "odd", "storage": "bits"}))


def test_a_reader_that_never_imported_quantize_knows_the_built_in_schemes(lenet5_trained, tmp_path):
    """`compress decode` reads a .cpz through the container alone: the schemes it names must still be known."""
    import subprocess
    import sys

    from compress.cpz.container import save_cpz

    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=4, scheme="mmse"))
    save_cpz(m, tmp_path / "m.cpz")
    code = (
        "import sys; from compress.cpz.container import load_cpz; m = load_cpz(sys.argv[1]); "
        "from compress.quant_state import get_state; print(get_state(m.conv1).scheme)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.cpz")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "mmse", r.stderr
