import copy

import pytest
import torch

from compress import data as data_mod
from compress import masks
from compress.config import FineTune
from compress.counting import count_macs, count_nonzero, count_params
from compress.models import create_model
from compress.prune import (
    ChannelUnionConfig,
    L1FilterConfig,
    ThresholdConfig,
    prune_,
    ratios_for_budget,
    sensitivity,
    sparsity_of,
)
from compress.prune.channel_union import GroupLasso, ResidualIdentity, reconfigure
from compress.prune.graph import channel_groups, prune_group
from compress.scoring import evaluate
from compress.train import fit
from tests.helpers import one_line_error


@pytest.fixture(scope="module")
def small32():
    ds = data_mod.load("mnist5k?size=32&limit=600")
    return data_mod.split(ds, 0.2, seed=0)


@pytest.fixture(scope="module")
def resnet8_trained(small32):
    torch.manual_seed(0)
    m = create_model("resnet8", width=0.5)
    fit(m, small32[0], FineTune(epochs=3, lr=3e-3, batch_size=32))
    return m


# ---------------------------------------------------------------- threshold
def test_threshold_reaches_sparsity_and_masks_hold(lenet5_trained, mnist_small):
    tr, va = mnist_small
    m = copy.deepcopy(lenet5_trained)
    before = evaluate(m, va)
    prune_(m, ThresholdConfig(sparsity=0.9, rounds=2, finetune=FineTune(epochs=1.0)), tr.subset(range(600)))
    assert abs(sparsity_of(m) - 0.9) < 0.01
    assert count_params(m) / count_nonzero(m) > 8
    assert not masks.has_masks(m) and "_compress_mask" not in str(m.__dict__.keys())
    assert evaluate(m, va) > before - 10  # fine-tuning kept it working


def test_sensitivity_allocation_keeps_the_layers_that_matter(lenet5_trained, mnist_small):
    """At 97% overall, one quality x std rule over the model strips the small layers; sharing the
    pruning by measured loss per weight removed keeps them and costs far less loss."""
    import torch.nn.functional as F

    tr, va = mnist_small
    by = {}
    for allocate in ("std", "sensitivity"):
        m = copy.deepcopy(lenet5_trained)
        prune_(
            m, ThresholdConfig(sparsity=0.97, allocate=allocate, rounds=1, finetune=FineTune(epochs=0)), train_data=tr
        )
        assert abs(sparsity_of(m) - 0.97) < 0.005, allocate
        with torch.no_grad():
            loss = float(F.cross_entropy(m(va.x), va.y))
        by[allocate] = (loss, float((m.conv1.weight != 0).float().mean()), float((m.fc1.weight != 0).float().mean()))
    assert by["sensitivity"][0] < by["std"][0]
    assert by["sensitivity"][1] > by["std"][1]  # conv1 (500 weights) keeps more
    assert by["sensitivity"][2] < 0.03  # fc1 (400,000) gives up the most


def test_allocation_takes_the_cheapest_weights_first():
    import numpy as np

    from compress.prune.allocate import allocate

    curve = (np.array([0.0, 0.5, 0.9, 0.99]), np.array([0.0, 0.01, 0.1, 1.0]))
    sizes = {"small": 100, "big": 10_000}
    per = allocate({"small": curve, "big": curve}, sizes, 0.9)
    total = sum(per[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert abs(total - 0.9) < 1e-9
    assert per["big"] > 0.9 > per["small"]  # the same harm per layer is 100x cheaper per weight in the big one


def test_schedules_rise_from_where_the_model_is():
    from compress.prune.threshold import round_targets

    cubic = round_targets(ThresholdConfig(sparsity=0.9, rounds=3), start=0.5)
    geo = round_targets(ThresholdConfig(sparsity=0.9, rounds=3, schedule="geometric"), start=0.5)
    for t in (cubic, geo):
        assert t[-1] == pytest.approx(0.9) and all(a < b for a, b in zip([0.5] + t, t, strict=False))
    assert cubic[0] - 0.5 > cubic[2] - cubic[1]  # Zhu & Gupta: fast first, gently at the end
    assert cubic[0] == pytest.approx(0.9 - 0.4 * (2 / 3) ** 3)


def test_masks_hold_through_training(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    m = copy.deepcopy(lenet5_trained)
    cfg = ThresholdConfig(sparsity=0.8, rounds=1, finetune=FineTune(epochs=0))
    prune_(m, cfg)
    zeros = {n: (p == 0) for n, p in m.named_parameters() if p.dim() > 1}
    # re-attach masks and train hard: pruned weights (and their grads / Adam state) stay zero
    for mod in m.modules():
        if hasattr(mod, "weight") and mod.weight is not None and mod.weight.dim() > 1:
            masks.set_mask(mod, (mod.weight != 0).float())
    fit(m, tr.subset(range(300)), FineTune(epochs=1, lr=1e-2))
    for n, p in m.named_parameters():
        if n in zeros:
            assert torch.all(p[zeros[n]] == 0), n
    masks.remove_masks(m)
    assert not masks.has_masks(m)


def test_first_and_last_layers_pruned_less(lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity=0.9, rounds=1, finetune=FineTune(epochs=0)))
    sp = {n: float((mod.weight == 0).float().mean()) for n, mod in m.named_modules() if hasattr(mod, "weight")}
    assert sp["conv1"] < sp["fc1"] and sp["fc2"] < sp["fc1"]


def test_quality_and_per_type_sparsity(lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity={"conv": 0.5, "linear": 0.95}, rounds=1, finetune=FineTune(epochs=0)))
    assert abs(float((m.fc1.weight == 0).float().mean()) - 0.95) < 0.01
    assert abs(float((m.conv2.weight == 0).float().mean()) - 0.5) < 0.01
    q = copy.deepcopy(lenet5_trained)
    prune_(q, ThresholdConfig(quality=1.0, rounds=1, finetune=FineTune(epochs=0), first_last_factor=1.0))
    w = lenet5_trained.fc1.weight
    expected = float((w.abs() <= w.std()).float().mean())
    assert abs(float((q.fc1.weight == 0).float().mean()) - expected) < 1e-3


def test_config_validation():
    with pytest.raises(ValueError):
        ThresholdConfig()
    with pytest.raises(ValueError):
        ThresholdConfig(sparsity=1.5)
    with pytest.raises(ValueError):
        L1FilterConfig(ratio=1.2)
    from compress.config import Config

    cfg = ThresholdConfig(sparsity=0.9, finetune=FineTune(epochs=2, lr=3e-3))
    d = cfg.to_dict()
    assert d["type"] == "ThresholdConfig" and d["version"] == ThresholdConfig.version
    assert Config.from_dict(d) == cfg  # the parts travel as tables
    with pytest.raises(ValueError, match="newer"):
        Config.from_dict({**d, "version": ThresholdConfig.version + 1})


def test_each_verb_refuses_another_verbs_config():
    from compress import UsageError
    from compress.factorize import FactorizeConfig
    from compress.method import factorize_, quantize_
    from compress.quantize import QuantConfig

    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    w = m[0].weight.detach().clone()
    with pytest.raises(UsageError, match="QuantConfig belongs to quantize_"):
        prune_(m, QuantConfig(bits=4))
    with pytest.raises(UsageError, match="ThresholdConfig belongs to prune_"):
        quantize_(m, ThresholdConfig(sparsity=0.5))
    with pytest.raises(UsageError, match="L1FilterConfig belongs to prune_"):
        factorize_(m, L1FilterConfig())
    with pytest.raises(UsageError, match="FactorizeConfig belongs to factorize_"):
        prune_(m, FactorizeConfig(rank=2))
    with pytest.raises(UsageError, match="takes a config"):
        prune_(m, FineTune())
    assert torch.equal(m[0].weight, w)  # nothing was changed


# ---------------------------------------------------------------- l1-filter
@pytest.mark.parametrize("name", ["resnet8", "vgg_small", "mobilenet_small", "squeezenet_small"])
def test_l1_filter_shrinks_and_stays_runnable(name):
    torch.manual_seed(0)
    m = create_model(name, width=0.5) if name != "squeezenet_small" else create_model(name)
    p0, mac0 = count_params(m), count_macs(m, (1, 1, 32, 32))
    prune_(m, L1FilterConfig(ratio=0.3), input_shape=(1, 1, 32, 32))
    assert count_params(m) < 0.8 * p0 and count_macs(m, (1, 1, 32, 32)) < mac0
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)  # classifier outputs never pruned


def test_l1_removes_smallest_filters_and_keeps_the_rest_exact():
    torch.manual_seed(0)
    m = create_model("vgg_small", width=0.25).eval()
    first = m.features[0][0]
    with torch.no_grad():
        first.weight[:3] *= 0.01  # three weak filters
    kept_before = first.weight[3:].clone()
    prune_(m, L1FilterConfig(ratio={"features.0.0": 3, "_default": 0}), input_shape=(1, 1, 32, 32))
    assert m.features[0][0].out_channels == kept_before.shape[0]
    assert torch.equal(m.features[0][0].weight, kept_before)  # unpruned channels unchanged


def test_unpruned_channels_give_same_outputs():
    """Removing channels whose every coupled slice is zero leaves the outputs unchanged."""
    torch.manual_seed(0)
    m = create_model("resnet8", width=0.5).eval()
    _, groups = channel_groups(m, (1, 1, 32, 32), roots=(torch.nn.Conv2d,))
    from compress.prune.graph import scale_channels

    cg = [g for g in groups if g.name == "layer1.0.conv1"][0]
    scale = torch.ones(cg.size)
    scale[:3] = 0
    scale_channels(cg.group, scale)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        y0 = m(x)
    dg, groups = channel_groups(m, (1, 1, 32, 32), roots=(torch.nn.Conv2d,))
    assert prune_group(dg, [g for g in groups if g.name == "layer1.0.conv1"][0], [0, 1, 2], m, (1, 1, 32, 32)) is None
    assert m.layer1[0].conv1.out_channels == cg.size - 3
    with torch.no_grad():
        assert torch.allclose(m(x), y0, atol=1e-5)


def test_sensitivity_and_budget(resnet8_trained, small32):
    _, va = small32
    sens = sensitivity(resnet8_trained, va, ratios=(0.25, 0.75), input_shape=(1, 1, 32, 32))
    assert set(sens["layers"]) and all(len(r["accuracy"]) == 2 for r in sens["layers"].values())
    ratios = ratios_for_budget(sens, 100.0)
    assert all(v == 0.75 for k, v in ratios.items() if k != "_default")
    strict = ratios_for_budget(sens, -1000)
    assert all(v == 0.0 for v in strict.values())


# ---------------------------------------------------------------- channel-union
def test_reconfigure_removes_union_of_zero_channels(resnet8_trained):
    m = copy.deepcopy(resnet8_trained).eval()
    lasso = GroupLasso(m, (1, 1, 32, 32))
    stage = [g for g in lasso.groups if g.name == "conv1"][0]  # the stage-1 identity channels
    from compress.prune.graph import scale_channels

    scale = torch.ones(stage.size)
    scale[0] = 0  # zero in every layer that shares it
    scale_channels(stage.group, scale)
    # channel 1: zero the stem only; the residual blocks still write into it -> must be kept
    with torch.no_grad():
        m.bn1.weight[1] = 0
        m.bn1.bias[1] = 0
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y0 = m(x)
    reconfigure(m, lasso, ChannelUnionConfig())
    assert m.conv1.out_channels == stage.size - 1
    with torch.no_grad():
        assert torch.allclose(m(x), y0, atol=1e-5)


def test_dead_branch_becomes_identity(resnet8_trained):
    m = copy.deepcopy(resnet8_trained).eval()
    lasso = GroupLasso(m, (1, 1, 32, 32))
    g = [g for g in lasso.groups if g.name == "layer2.0.conv1"][0]
    from compress.prune.graph import scale_channels

    scale_channels(g.group, torch.zeros(g.size))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y0 = m(x)
    reconfigure(m, lasso, ChannelUnionConfig())
    assert isinstance(m.layer2[0], ResidualIdentity)
    with torch.no_grad():
        assert torch.allclose(m(x), y0, atol=1e-4)


def test_channel_union_trains_and_shrinks(resnet8_trained, small32):
    tr, va = small32
    m = copy.deepcopy(resnet8_trained)
    p0 = count_params(m)
    from compress.method import Context, run

    cfg = ChannelUnionConfig(
        lasso_ratio=1.5, finetune=FineTune(epochs=3, lr=0.02, optimizer="sgd", batch_size=16, augment=0)
    )
    recs = run("prune", m, cfg, Context(train=tr, val=va)).records
    assert len(recs) == 4 and recs[0]["params"] == p0
    assert count_params(m) < p0
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- CLI
def test_prune_cli_threshold(tmp_path, cli, lenet5_trained):
    from compress.model_io import save_model

    src = tmp_path / "m.pt"
    save_model(copy.deepcopy(lenet5_trained), src)
    res = cli(
        "prune",
        src,
        "--method",
        "threshold",
        "--sparsity",
        "0.8",
        "--train-data",
        "mnist5k?limit=300",
        "--epochs",
        "1",
        "--rounds",
        "1",
        "-o",
        tmp_path / "p.pt",
        "--report",
        tmp_path / "rep",
    )
    assert res.code == 0, res.err
    assert "before / after" in res.out and "nonzero parameters" in res.out
    assert "accuracy on 20% held out of --train-data, 61 samples" in " ".join(
        res.out.split()
    )  # the real split (stratified)
    assert "warning" not in res.err
    assert ".cpz" in res.out and "top-1" in res.out and "agreement" in res.out  # rows wrap in a narrow table
    for f in ("report.json", "report.md", "report.html", "layers.png", "weight_histograms.png"):
        assert (tmp_path / "rep" / f).exists()
    from compress.model_io import load_model

    p = load_model(tmp_path / "p.pt")
    assert 0.75 < sparsity_of(p) < 0.85
    # without data nothing says what a change cost: a warning says so (90% pruned LeNet-5 can score 16%)
    res = cli("prune", src, "--sparsity", "0.9", "-o", tmp_path / "blind.pt")  # fine-tunes by default: needs data
    assert one_line_error(res) and "--train-data" in res.err and "--epochs 0" in res.err
    res = cli("prune", src, "--sparsity", "0.9", "--epochs", "0", "-o", tmp_path / "blind.pt")
    assert res.code == 0 and "warning: no --train-data or --test-data" in res.err
    assert "output change" in res.out and "random" in res.out  # what it did to the outputs, still
    # the input is never overwritten without --force
    res = cli("prune", src, "--sparsity", "0.5", "-o", src)
    assert res.code == 1 and "--force" in res.err


def test_prune_cli_l1_sensitivity(tmp_path, cli, resnet8_trained):
    from compress.meta import set_meta
    from compress.model_io import save_model

    m = copy.deepcopy(resnet8_trained)
    set_meta(m, input_shape=[1, 1, 32, 32])
    save_model(m, tmp_path / "r.pt")
    res = cli(
        "prune",
        tmp_path / "r.pt",
        "--method",
        "l1-filter",
        "--sensitivity",
        "--budget",
        "2",
        "--train-data",
        "mnist5k?size=32&limit=300",
        "-o",
        tmp_path / "r1.pt",
    )
    assert res.code == 0, res.err
    assert (tmp_path / "r1-sensitivity" / "sensitivity.png").exists()
    assert "sensitivity" in res.out


def test_prune_cli_channel_union_uses_library_defaults(tmp_path, cli):
    from compress.meta import set_meta
    from compress.model_io import load_model, save_model

    torch.manual_seed(0)
    m = create_model("resnet8", width=0.5)
    set_meta(m, input_shape=[1, 1, 8, 8])
    save_model(m, tmp_path / "r.pt")
    res = cli(
        "prune",
        tmp_path / "r.pt",
        "--method",
        "channel-union",
        "--train-data",
        "digits",
        "--epochs",
        "1",
        "-o",
        tmp_path / "cu.pt",
    )
    assert res.code == 0, res.err
    hist = load_model(tmp_path / "cu.pt").compress_meta["history"]
    cfg = [h for h in hist if h.get("stage") == "channel-union"][0]["config"]
    from compress.config import Config

    kept = Config.from_dict(cfg)  # the history keeps what differs from the defaults
    assert (
        kept.lasso_ratio == ChannelUnionConfig().lasso_ratio and kept.finetune.epochs == 1 == cfg["finetune"]["epochs"]
    )
    assert "reconfiguration after epoch 1" in res.err


@pytest.mark.parametrize(
    "args,match",
    [
        (["prune", "--sparsity", "nosuchlayer=0.5", "--epochs", "0"], "no prunable layer 'nosuchlayer'"),
        (["prune", "--layers", "nosuch*", "--epochs", "0"], "matches no layer"),
        (["quantize", "--bits", "fc9=4"], "no quantized layer of that name (did you mean"),
        (["quantize", "--layers", "conv9"], "matches no layer"),
        (["factorize", "--rank", "2", "--exclude", "fc1", "--layers", "zz*"], "matches no layer"),
        (["prune", "--rounds", "0", "--epochs", "0"], "rounds"),
        (["prune", "--lr", "-1", "--train-data", "mnist5k?limit=100"], "lr must be > 0"),
    ],
)
def test_settings_that_select_nothing_or_are_invalid_are_errors(tmp_path, cli, lenet5_trained, args, match):
    from compress.model_io import save_model

    src = tmp_path / "m.pt"
    save_model(copy.deepcopy(lenet5_trained), src)
    res = cli(args[0], src, *args[1:], "-o", tmp_path / "out.pt")
    assert one_line_error(res) and match in res.err, res.err
    assert not (tmp_path / "out.pt").exists()


def test_l1_filter_round_to_keeps_channel_multiples():
    torch.manual_seed(0)
    m = create_model("resnet20")
    from compress.method import Context, run

    res = run("prune", m, L1FilterConfig(ratio=0.3, round_to=8), Context(input_shape=(1, 1, 32, 32)))
    kept = [r["channels_after"] for r in res.layers]
    assert kept and all(k % 8 == 0 for k in kept), kept
    assert all(r["channels_after"] < r["channels_before"] for r in res.layers)
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="round_to"):
        L1FilterConfig(round_to=0)


def test_l1_filter_prunes_linear_neurons_but_never_the_classifier():
    from compress.method import Context, run

    torch.manual_seed(0)
    m = create_model("lenet300")
    res = run("prune", m, L1FilterConfig(ratio=0.5), Context(input_shape=(1, 1, 28, 28)))
    assert {r["name"]: r["channels_after"] for r in res.layers} == {"fc1": 150, "fc2": 50}
    assert (m.fc1.out_features, m.fc2.in_features, m.fc3.in_features, m.fc3.out_features) == (150, 150, 50, 10)
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_l1_filter_prunes_a_transformer_block_and_it_still_runs():
    """ViT pattern: patch conv -> MultiheadAttention + MLP with LayerNorm -> head. The embedding width
    is one group (patch conv, attention projections, LayerNorms, MLP output, head input)."""
    import torch.nn as nn

    from compress.method import Context, run

    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, 64, 4, 4)
            self.enc = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.enc(self.patch(x).flatten(2).transpose(1, 2)).mean(1))

    torch.manual_seed(0)
    m = TinyViT().eval()
    macs = count_macs(m, (1, 1, 28, 28))
    res = run("prune", m, L1FilterConfig(ratio=0.5), Context(input_shape=(1, 1, 28, 28)))
    assert {r["name"]: r["channels_after"] for r in res.layers} == {"enc.linear2": 32, "enc.linear1": 64}
    assert m.patch.out_channels == 32 and m.enc.self_attn.embed_dim == 32 and m.head.in_features == 32
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and count_macs(m, (1, 1, 28, 28)) < 0.5 * macs


def test_kept_channels_honour_round_to_and_conv_groups_together():
    import math

    from compress.prune.l1_filter import _count

    for size, ratio, round_to, groups in [(96, 0.5, 3, 4), (64, 0.3, 8, 32), (48, 0.4, 1, 6)]:
        kept = size - _count(ratio, size, 1, math.lcm(round_to, groups))
        assert kept % round_to == 0 and kept % groups == 0 and 0 < kept < size, (size, kept)


def test_a_moved_block_still_loads_by_its_old_name():
    """ResidualIdentity moved to compress.models.blocks; files that name its old home still resolve."""
    from compress.cpz.arch import resolve_class
    from compress.models.blocks import ResidualIdentity as Moved

    assert resolve_class("compress.prune.channel_union.ResidualIdentity") is Moved
    assert resolve_class("compress.models.blocks.ResidualIdentity") is Moved
    with pytest.raises(ValueError):
        resolve_class("compress.prune.channel_union.GroupLasso")  # a method module is not a model module
