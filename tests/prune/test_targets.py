"""--target-macs / --target-params: l1-filter ranks channels across layers and lands on the target."""

import importlib

import pytest
import torch

from compress.counting import count_macs, count_params
from compress.method import Context, run
from compress.models import create_model
from compress.prune import L1FilterConfig


def _model(name):
    if name == "resnet20":
        return create_model("resnet20", in_channels=3), (1, 3, 32, 32)
    mod, fn = "pytorchcv.models.seresnet_cifar", "seresnet20_cifar10"  # squeeze-excitation, nobody here wrote it
    return getattr(importlib.import_module(mod), fn)(), (1, 3, 32, 32)


# SE-ResNet-20 (2-3 minutes each on a busy machine) runs in `make bench` (marked slow)
@pytest.mark.parametrize("name", ["resnet20", pytest.param("seresnet20", marks=pytest.mark.slow)])
@pytest.mark.parametrize("what,target", [("macs", 0.5), ("params", 0.4)])
def test_lands_within_5_percent_of_the_target(name, what, target):
    torch.manual_seed(0)
    m, shape = _model(name)
    measure = (lambda x: count_macs(x, shape)) if what == "macs" else count_params
    before = measure(m)
    res = run("prune", m, L1FilterConfig(**{f"target_{what}": target}), Context(input_shape=shape))
    got = measure(res.model) / before
    assert abs(got / target - 1) <= 0.05, got
    assert res.records[0]["reached"] == pytest.approx(got, abs=1e-3)  # what the note says is what it did
    with torch.no_grad():
        assert res.model(torch.randn(2, *shape[1:])).shape == (2, 10)
    # global, not uniform: layers lose different fractions of their channels
    fractions = {r["channels_after"] / r["channels_before"] for r in res.layers}
    assert len(fractions) > 2


def test_a_count_target_and_a_miss_that_says_by_how_much():
    m, shape = _model("resnet20")
    before = count_macs(m, shape)
    res = run("prune", m, L1FilterConfig(target_macs=int(before * 0.6)), Context(input_shape=shape))
    assert count_macs(res.model, shape) / before == pytest.approx(0.6, rel=0.05)
    m, _ = _model("resnet20")
    res = run("prune", m, L1FilterConfig(target_macs=0.001, min_channels=4), Context(input_shape=shape))
    note = res.notes[-1]
    assert "target MACs 0.001" in note and "cannot go closer" in note  # 4 channels a group cost more than that


def test_bad_targets():
    with pytest.raises(ValueError, match="not both"):
        L1FilterConfig(target_macs=0.5, target_params=0.5)
    for bad in (0, -0.5, 1.5, True):
        with pytest.raises(ValueError, match="target_macs"):
            L1FilterConfig(target_macs=bad)


def test_cli_target(cli, tmp_path, lenet5_trained):
    from compress.model_io import save_model

    save_model(lenet5_trained, tmp_path / "l5.pt")
    r = cli(
        "prune",
        tmp_path / "l5.pt",
        "-m",
        "l1-filter",
        "--target-macs",
        "0.5",
        "--epochs",
        "0",
        "--no-latency",
        "--json",
        tmp_path / "r.json",
        "-o",
        tmp_path / "p.pt",
    )
    assert r.code == 0, r.err
    assert "note: target MACs 0.500 of the input model: reached 0." in r.err
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["after"]["macs"] / res["before"]["macs"] == pytest.approx(0.5, rel=0.05)
    r = cli(
        "prune",
        tmp_path / "l5.pt",
        "-m",
        "threshold",
        "--target-macs",
        "0.5",
        "--train-data",
        "digits",
        "-o",
        tmp_path / "c.pt",
    )
    assert r.code == 2 and "--sparsity" in r.err and not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("target", [0.6, pytest.param(0.3, marks=pytest.mark.slow)])  # 0.3: 4 minutes, in make bench
def test_channel_union_lands_on_its_target_and_fine_tunes_the_rest(target):
    """The group lasso removes what it drives to zero; at 3/4 of the training the rest above the target goes by L1
    ranking, and the last quarter fine-tunes: within 5% of the target, and better than the moment it was cut."""
    from compress import data as data_mod
    from compress.config import FineTune
    from compress.prune import ChannelUnionConfig
    from compress.train import fit

    tr, va = data_mod.split(data_mod.load("digits"), 0.2)
    torch.manual_seed(0)
    m = create_model("resnet8", width=0.5)
    fit(m, tr, FineTune(epochs=4, lr=3e-3, batch_size=32))
    shape = (1, 1, 8, 8)
    before = count_macs(m, shape)
    res = run(
        "prune",
        m,
        ChannelUnionConfig(target_macs=target, finetune=FineTune(epochs=3, lr=0.02, optimizer="sgd")),
        Context(train=tr, val=va, input_shape=shape),
    )
    assert abs(count_macs(res.model, shape) / before / target - 1) <= 0.05
    assert any("removed by L1 ranking at" in n and "fine-tuned for the rest" in n for n in res.notes), res.notes
    accs = [r["accuracy"] for r in res.records if "accuracy" in r]
    cut = next(i for i, r in enumerate(res.records) if r.get("macs", before) < before)
    assert accs[-1] > res.records[cut]["accuracy"]  # the last quarter recovered accuracy after the cut


def test_latency_target_prunes_and_reports_what_it_measured(cli, tmp_path):
    """--target-latency: trial prunings timed against the input (interleaved); the note gives the fraction it
    measured. Timing is noise-prone, so this checks what it did, not where it landed (benchmarks do that)."""
    import json

    from compress.meta import set_meta
    from compress.model_io import save_model

    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1)
    set_meta(m, input_shape=[1, 1, 32, 32])
    save_model(m, tmp_path / "r.pt")
    r = cli(
        "prune",
        tmp_path / "r.pt",
        "-m",
        "l1-filter",
        "--target-latency",
        "0.6",
        "--no-latency",
        "--json",
        tmp_path / "r.json",
        "-o",
        tmp_path / "p.pt",
    )
    assert r.code == 0, r.err
    assert "note: target latency 0.600 of the input model: reached 0." in r.err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["after"]["macs"] < 0.8 * res["before"]["macs"]  # it pruned to get there
    assert res["records"][0]["target"] == "latency" and 0 < res["records"][0]["reached"] < 1
    with pytest.raises(ValueError, match="one of"):
        L1FilterConfig(target_latency=0.5, target_macs=0.5)
    with pytest.raises(ValueError, match="target_latency"):
        L1FilterConfig(target_latency=1.5)
    r = cli(
        "prune",
        tmp_path / "r.pt",
        "-m",
        "channel-union",
        "--target-latency",
        "0.5",
        "--train-data",
        "digits",
        "-o",
        tmp_path / "c.pt",
    )
    assert r.code == 2 and "--target-macs" in r.err


def test_importance_is_chosen_by_name_and_a_new_one_is_one_class():
    """bn-scale removes the channels whose BatchNorm scale is smallest, whatever their filters' norms; a registered
    criterion is used by name; an unknown name is refused."""
    from compress.prune import IMPORTANCES, L1FilterConfig, register_importance

    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1)
    with torch.no_grad():  # the stem's BatchNorm: tiny gammas on channels 0-7, large filters there too
        m.bn1.weight.fill_(1.0)
        m.bn1.weight[:8] = 1e-3
        m.conv1.weight[:8] *= 100
    shape = (1, 1, 32, 32)
    res = run(
        "prune", m, L1FilterConfig(ratio={"conv1": 8, "_default": 0}, importance="bn-scale"), Context(input_shape=shape)
    )
    assert bool((res.model.bn1.weight.abs() > 0.5).all())  # the eight tiny-gamma channels went

    calls = []

    @register_importance("test-reverse-l1")
    class ReverseL1:
        def __call__(self, group, size=None):
            calls.append(size)
            return -IMPORTANCES["l1"]()(group, size)

    try:
        m2 = create_model("resnet20", in_channels=1)
        run("prune", m2, L1FilterConfig(ratio=0.25, importance="test-reverse-l1"), Context(input_shape=shape))
        assert calls
    finally:
        IMPORTANCES.pop("test-reverse-l1")
    with pytest.raises(ValueError, match="importance 'snip' unknown"):
        L1FilterConfig(importance="snip")
