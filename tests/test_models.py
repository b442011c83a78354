import pytest
import torch

from compress import data as data_mod
from compress.errors import UsageError
from compress.metrics import count_macs, count_params, layer_table
from compress.models import create_model, list_models
from compress.train import TrainConfig, evaluate, fit


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
    fit(m, tr, TrainConfig(epochs=3, lr=3e-3))
    assert evaluate(m, va) > max(85.0, before + 50)
