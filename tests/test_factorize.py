import copy

import pytest
import torch
import torch.nn as nn

from compress.counting import count_params
from compress.factorize import FactorizeConfig, choose_rank, factor_layer
from compress.method import factorize_, run
from compress.model_io import load_model, save_model
from compress.models import create_model


def test_exact_rank_linear_is_reconstructed():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 5) @ torch.randn(5, 64))  # rank 5
    seq, err = factor_layer(lin, 5)
    assert err < 1e-6
    x = torch.randn(7, 64)
    assert torch.allclose(seq(x), lin(x), atol=1e-4)
    assert seq[0].bias is None and torch.equal(seq[1].bias, lin.bias)  # bias kept on the second


def test_exact_rank_conv_is_reconstructed():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(16, 3) @ torch.randn(3, 6 * 9)).view(16, 6, 3, 3))
    seq, err = factor_layer(conv, 3)
    assert err < 1e-6
    assert seq[0].kernel_size == (3, 3) and seq[0].stride == (2, 2) and seq[1].kernel_size == (1, 1)
    x = torch.randn(2, 6, 11, 11)
    assert torch.allclose(seq(x), conv(x), atol=1e-4)


def test_rank_choice():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    tot = float((s**2).sum())
    assert choose_rank(s, FactorizeConfig(energy=9 / tot)) == 1
    assert choose_rank(s, FactorizeConfig(energy=(9 + 4) / tot + 1e-6)) == 3
    assert choose_rank(s, FactorizeConfig(rank_ratio=0.5)) == 2
    assert choose_rank(s, FactorizeConfig(rank=10)) == 4
    with pytest.raises(ValueError):
        FactorizeConfig(energy=0.8, rank=3)


def test_high_energy_keeps_outputs_and_saves(tmp_path, lenet5_trained, mnist_small):
    m = copy.deepcopy(lenet5_trained)
    x = mnist_small[1].x[:50]
    with torch.no_grad():
        y0 = m(x)
    factorize_(m, FactorizeConfig(energy=0.9999))
    with torch.no_grad():
        y1 = m(x)
    assert (y1.argmax(1) == y0.argmax(1)).float().mean() > 0.97
    assert torch.allclose(y1, y0, atol=0.05 * float(y0.abs().max()))
    save_model(m, tmp_path / "f.pt")
    again = load_model(tmp_path / "f.pt")
    assert torch.equal(again(x), m(x))


def test_factorize_only_when_smaller_and_skips_depthwise():
    m = create_model("mobilenet_small", width=0.5)
    p0 = count_params(m)
    rows = run("factorize", m, FactorizeConfig(rank_ratio=0.25)).layers
    dw = [r for r in rows if r["name"].endswith("dw.0")]
    assert dw and all(r["action"] == "kept" and "depthwise" in r["reason"] for r in dw)
    full = run("factorize", create_model("lenet300"), FactorizeConfig(rank_ratio=1.0)).layers
    assert all(r["action"] == "kept" for r in full)  # full rank is never smaller
    assert count_params(m) < p0
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_factorize_cli(tmp_path, cli, lenet5_trained):
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    res = cli(
        "factorize",
        tmp_path / "m.pt",
        "--rank",
        "20",
        "--layers",
        "fc*",
        "-o",
        tmp_path / "f.pt",
        "--train-data",
        "mnist5k?limit=200",
    )
    assert res.code == 0, res.err
    assert "20/500" in res.out or "20/" in res.out
    f = load_model(tmp_path / "f.pt")
    assert isinstance(f.fc1, nn.Sequential) and isinstance(f.conv1, nn.Conv2d)
    res = cli("factorize", tmp_path / "m.pt", "--rank", "2", "--energy", "0.5", "-o", tmp_path / "g.pt")
    assert res.code == 2 and "exactly one" in res.err
