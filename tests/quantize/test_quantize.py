import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.coding import packing
from compress.config import FineTune
from compress.model_io import load_model, save_model
from compress.models import create_model
from compress.prune import ThresholdConfig, prune_
from compress.quant_state import get_state
from compress.quantize import QuantConfig, quantize_
from compress.scoring import evaluate


def _grid_ok(m):
    for name, mod in m.named_modules():
        state = get_state(mod)
        if state is not None:
            state.check(mod.weight, name)  # raises if a weight is off its grid
            if state.is_codebook:
                assert len(torch.unique(mod.weight[mod.weight != 0])) <= 2**state.bits
            else:
                assert int(state.codes.min()) >= 0 and int(state.codes.max()) < 2**state.bits


@pytest.mark.parametrize("scheme", ["minmax", "mmse", "kmeans", "pow2"])
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_weights_lie_on_grid(lenet5_trained, scheme, bits):
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=bits, scheme=scheme))
    _grid_ok(m)
    per_channel_vals = m.conv2.weight.flatten(1)
    if scheme in ("minmax", "mmse"):  # per channel: each output channel has at most 2^bits - 1 levels
        assert max(len(torch.unique(r)) for r in per_channel_vals) <= 2**bits - 1


def test_mmse_beats_minmax_at_4_bits_on_every_layer(lenet5_trained, mnist_small):
    a, b = copy.deepcopy(lenet5_trained), copy.deepcopy(lenet5_trained)
    from compress.method import run

    ra = {r["name"]: r["mse"] for r in run("quantize", a, QuantConfig(bits=4, scheme="minmax")).layers}
    rb = {r["name"]: r["mse"] for r in run("quantize", b, QuantConfig(bits=4, scheme="mmse")).layers}
    assert all(rb[n] < ra[n] for n in ra), (ra, rb)
    _, va = mnist_small
    assert evaluate(b, va) >= evaluate(a, va) - 0.5


def test_int8_keeps_accuracy(lenet5_trained, mnist_small):
    _, va = mnist_small
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=8))
    assert evaluate(m, va) >= evaluate(lenet5_trained, va) - 0.5  # one sample of 199 is 0.5 pt


def test_zeros_stay_zero(lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity=0.9, rounds=1, finetune=FineTune(epochs=0)))
    zeros = {n: p == 0 for n, p in m.named_parameters() if p.dim() > 1}
    for scheme in ("minmax", "mmse", "kmeans"):
        q = copy.deepcopy(m)
        quantize_(q, QuantConfig(bits=4, scheme=scheme, symmetric=scheme != "minmax"))
        for n, p in q.named_parameters():
            if n in zeros:
                assert torch.all(p[zeros[n]] == 0)


def test_kmeans_centroid_finetune_keeps_sharing(lenet5_trained, mnist_small):
    tr, va = mnist_small
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity=0.8, rounds=1, finetune=FineTune(epochs=0)))
    nz = int(torch.count_nonzero(m.fc1.weight))
    before = {n: p.clone() for n, p in m.named_parameters()}
    quantize_(
        m,
        QuantConfig(bits=3, scheme="kmeans", finetune=FineTune(epochs=0.5, lr=1e-3)),
        train_data=tr.subset(range(500)),
    )
    _grid_ok(m)
    assert int(torch.count_nonzero(m.fc1.weight)) == nz  # sparsity kept through centroid training
    from compress.quantize import quantize_tensor

    on_grid = quantize_tensor(before["fc1.bias"], 8, "minmax", False, True).dequantize(m.fc1.bias.shape)
    assert torch.equal(m.fc1.bias, on_grid)  # only centroids train; biases stay on their 8-bit grid
    assert len(torch.unique(m.fc1.weight)) <= 2**3 + 1


def test_quantized_model_saves_and_codes_survive(tmp_path, lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=4, scheme="mmse"))
    save_model(m, tmp_path / "q.pt")
    again = load_model(tmp_path / "q.pt")  # no --trust-pickle needed
    assert torch.equal(get_state(m.fc1).codes, get_state(again.fc1).codes)
    get_state(again.fc1).check(again.fc1.weight)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_roundtrip(bits, data):
    n = data.draw(st.integers(0, 300))
    codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), dtype=np.uint32)
    packed = packing.pack(codes, bits)
    assert len(packed) == (n * bits + 7) // 8
    assert np.array_equal(packing.unpack(packed, bits, n), codes)


def test_int4_packs_two_per_byte():
    assert packing.pack(np.array([1, 2, 3]), 4) == bytes([0x12, 0x30])


def test_quantize_cli_and_validation(tmp_path, cli, lenet5_trained):
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    res = cli(
        "quantize",
        tmp_path / "m.pt",
        "--bits",
        "4",
        "--scheme",
        "mmse",
        "-o",
        tmp_path / "q.pt",
        "--test-data",
        "mnist5k?limit=200",
    )
    assert res.code == 0, res.err
    assert "SQNR" in res.out
    assert cli("quantize", tmp_path / "m.pt", "--bits", "9", "-o", tmp_path / "x.pt").code == 2
    assert cli("quantize", tmp_path / "m.pt", "--scheme", "bogus", "-o", tmp_path / "x.pt").code == 2


def test_export_onnx_and_int8(tmp_path, cli):
    torch.manual_seed(0)
    m = create_model("resnet8", width=0.5)
    m.compress_meta["input_shape"] = [1, 1, 32, 32]
    save_model(m, tmp_path / "r.pt")
    res = cli("export", tmp_path / "r.pt", "-o", tmp_path / "r.onnx")
    assert res.code == 0, res.err
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "r.onnx"))
    x = np.random.randn(5, 1, 32, 32).astype(np.float32)  # dynamic batch axis
    with torch.no_grad():
        ref = m.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(sess.run(None, {"input": x})[0] - ref).max() < 1e-4
    res = cli(
        "export",
        tmp_path / "r.pt",
        "--int8",
        "--calib-data",
        "mnist5k?size=32&limit=64",
        "--data",
        "mnist5k?size=32&limit=200",
        "-o",
        tmp_path / "q.onnx",
    )
    assert res.code == 0, res.err
    assert "INT8" in res.out and (tmp_path / "q.onnx").stat().st_size < (tmp_path / "r.onnx").stat().st_size
    rep = cli("report", tmp_path / "q.onnx", "--data", "mnist5k?size=32&limit=100", "--json", "-")
    assert rep.code == 0, rep.err
    import json

    assert json.loads(rep.out)["int8_params"] > 0
    assert cli("export", tmp_path / "r.pt", "--int8", "-o", tmp_path / "z.onnx").code == 2  # no calib data


def test_export_check_is_relative_to_the_outputs_scale(tmp_path):
    """A model whose outputs are all ~1e-7 passes any absolute 1e-4 check, however wrong; the check is
    relative to the largest output, so a tolerance below the real float error refuses it."""
    from compress.errors import InputError
    from compress.export import export

    torch.manual_seed(0)
    m = create_model("lenet300", input_size=8).eval()
    with torch.no_grad():
        m.fc3.weight.mul_(1e-6), m.fc3.bias.mul_(1e-6)
    res = export(m, tmp_path / "t.onnx", (1, 1, 8, 8))
    assert res["max_abs_diff"] < 1e-9 and res["max_rel_diff"] < 1e-4
    assert res["max_rel_diff"] > res["max_abs_diff"] * 1e5  # judged on the outputs' own scale
    if res["max_rel_diff"] > 0:
        with pytest.raises(InputError, match="of the largest output"):
            export(m, tmp_path / "u.onnx", (1, 1, 8, 8), tol=res["max_rel_diff"] / 2)
