import pytest
import torch

from compress import data as data_mod
from compress.config import FineTune
from compress.counting import count_macs, count_params
from compress.errors import UsageError
from compress.measure import layer_table
from compress.models import create_model, list_models
from compress.scoring import evaluate
from compress.train import fit


def test_lenet_sizes():
    assert count_params(create_model("lenet5")) == 431_080
    assert count_params(create_model("lenet300")) == 266_610
    assert count_macs(create_model("lenet5"), (1, 1, 28, 28)) == 2_293_000


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "vgg_small", "mobilenet_small", "squeezenet_small"])
def test_conv_zoo_runs_at_32(name):
    m = create_model(name, num_classes=10, in_channels=1).eval()
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    # per-layer MACs add up to the flop counter's total
    assert sum(r["macs"] for r in layer_table(m, (1, 1, 32, 32))) == count_macs(m, (1, 1, 32, 32))


def test_resnet_width_and_depth():
    assert count_params(create_model("resnet20", width=0.5)) < count_params(create_model("resnet20")) / 3
    assert len(list_models()) >= 8


def test_unknown_model_suggests():
    with pytest.raises(UsageError, match="did you mean .*resnet20"):
        create_model("resnet02")


def test_training_learns_digits():
    ds = data_mod.load("digits")
    tr, va = data_mod.split(ds, 0.2, seed=0)
    torch.manual_seed(0)
    m = create_model("lenet300", input_size=8)
    before = evaluate(m, va)
    fit(m, tr, FineTune(epochs=3, lr=3e-3))
    assert evaluate(m, va) > max(85.0, before + 50)


def test_attention_macs_are_counted_under_no_grad():
    """MultiheadAttention's fused fast path (taken under no_grad) is invisible to the FLOP counter;
    the count switches it off and counts the CPU attention kernel: 4 L E^2 + 2 L^2 E."""
    import torch.nn as nn

    from compress.counting import count_macs

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x):
            return self.a(x, x, x, need_weights=False)[0]

    m, n, e = Attn(), 16, 64
    with torch.no_grad():
        assert count_macs(m, (1, n, e)) == 4 * n * e * e + 2 * n * n * e
    assert torch.backends.mha.get_fastpath_enabled()  # left as it was


def test_quantize_says_what_it_leaves_in_float32():
    import torch.nn as nn

    from compress.method import run
    from compress.quantize import QuantConfig

    m = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    res = run("quantize", m, QuantConfig(bits=8))
    assert any("left in float32" in n and "1.in_proj_weight" in n for n in res.notes), res.notes


def test_latency_under_autocast_runs_and_is_reported():
    from compress.measure import latency_stats

    torch.manual_seed(0)
    m = create_model("lenet5").eval()
    fp32, bf16 = (
        latency_stats([m], (1, 1, 28, 28), batch=4, runs=3)[0],
        latency_stats([m], (1, 1, 28, 28), batch=4, runs=3, dtype=torch.bfloat16)[0],
    )
    assert fp32["ms"] > 0 and bf16["ms"] > 0 and bf16["p25"] <= bf16["median"] <= bf16["p75"]
