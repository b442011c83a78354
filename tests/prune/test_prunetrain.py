"""compress train: dense and PruneTrain (channel-union from the first step) training, its cost report, the
command's files and refusals. Real small models on sklearn's digits (8 x 8)."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from compress import data as data_mod
from compress.data import TensorData
from compress.method import Context
from compress.model_io import load_model
from compress.models import create_model
from compress.prune.channel_union import ChannelUnionConfig, ChannelUnionPruner
from compress.prune.prunetrain import BN_SAMPLES, MIN_CHANNELS, train_model
from tests.helpers import one_line_error


@pytest.fixture(scope="module")
def digits():
    ds = data_mod.load("digits?limit=256")
    x, y = ds.batch(torch.arange(len(ds)))
    return x, y


def test_training_macs_match_a_hand_count(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    forward = 4 * 1 * 9 * 8 * 8 + 4 * 8 * 8 * 10  # conv: out channels x in x kernel x positions; linear: in x out
    rep = train_model(model, (x, y), epochs=1.5, batch_size=32, lr=0.05).report
    assert rep["start"]["macs"] == forward
    samples = len(x) + len(x) // 2
    assert sum(e["samples"] for e in rep["epochs"]) == samples
    assert rep["total"]["train_macs"] == 3 * forward * samples  # forward + backward ~ 3 x forward, per sample
    assert rep["total"]["train_flops"] == 2 * rep["total"]["train_macs"]
    assert [e["train_macs"] for e in rep["epochs"]] == [3 * forward * len(x), 3 * forward * (len(x) // 2)]


def _user_loop(model, x, y, *, epochs, bs, lr, interval, lasso_ratio, cost_weight=1.0, min_channels=MIN_CHANNELS):
    """What a user writes around compress.ChannelUnionPruner: SGD, a cosine lr, the pruner's hooks (with
    ``compress train``'s settings)."""
    n = len(x)
    total = int(round(epochs * n))
    pruner = ChannelUnionPruner(
        model, ChannelUnionConfig(lasso_ratio=lasso_ratio, cost_weight=cost_weight, min_channels=min_channels),
        Context(train=(x, y), input_shape=(1, *x.shape[1:])), interval=interval, bn_samples=BN_SAMPLES,
    )  # fmt: skip
    pruner.attach()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)

    opt, seen = sgd(model), 0
    model.train()
    while seen < total:
        order = torch.randperm(n, generator=g)[: total - seen]
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            rate = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * seen / total)))
            for group in opt.param_groups:
                group["lr"] = rate
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
            if pruner.step(rate, optimizer=opt):  # the architecture changed: opt moved onto the new parameters
                model = pruner.model
                model.train()
    return pruner.finalize()


def _kept(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_library_loop_and_a_users_loop_keep_the_same_channels(digits):
    x, y = digits
    torch.manual_seed(0)
    start = create_model("resnet8", num_classes=10, in_channels=1, width=0.5)
    # 0.75 epochs of 256 samples in batches of 32: 6 steps, one reconfiguration after 4 (half an epoch)
    lib = train_model(
        copy.deepcopy(start), (x, y), method="channel-union", epochs=0.75, batch_size=32, lr=0.1, lasso_ratio=6,
        reconfig_every=0.5, freeze_last=0.0,
    )  # fmt: skip
    own = _user_loop(copy.deepcopy(start), x, y, epochs=0.75, bs=32, lr=0.1, interval=4, lasso_ratio=6)
    assert len(lib.report["reconfigurations"]) == 1
    assert _kept(lib.model) == _kept(own)
    assert sum(_kept(own)) < sum(_kept(start))  # channels were removed: the comparison means something
    for a, b in zip(lib.model.state_dict().values(), own.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)


def test_channel_union_training_shrinks_and_the_file_reloads_and_runs(tmp_path, cli):
    res = cli(
        "train", "--arch", "zoo:resnet8", "--width", "0.5", "--train-data", "digits?limit=240", "--epochs", "1.5",
        "-m", "channel-union", "--lasso-ratio", "6", "--lr", "0.1", "--reconfig-every", "0.5", "--grow-batch",
        "--max-batch", "128", "--threads", "1", "--json", tmp_path / "r.json", "--report", tmp_path / "rep",
        "-o", tmp_path / "m.pt",
    )  # fmt: skip
    assert res.code == 0, res.err
    rep = json.loads((tmp_path / "r.json").read_text())["runs"]["channel-union"]
    recs = rep["reconfigurations"]
    assert rep["final"]["macs"] < rep["start"]["macs"] and recs and recs[-1]["frozen"]
    # every epoch's training MACs follow the model as it shrank: the last epoch trained a smaller one than the first
    last = rep["epochs"][-1]
    assert last["train_macs"] >= 3 * rep["final"]["macs"] * last["samples"]
    assert last["train_macs"] / last["samples"] < rep["epochs"][0]["train_macs"] / rep["epochs"][0]["samples"]
    assert rep["total"]["train_macs"] < 3 * rep["start"]["macs"] * sum(e["samples"] for e in rep["epochs"])
    grown = [r for r in recs if "bytes_per_sample" in r]
    assert grown and grown[-1]["bytes_per_sample"] < grown[-1]["start_bytes_per_sample"]
    assert recs[-1]["batch"] > 32 and recs[-1]["batch"] <= 128
    assert (tmp_path / "rep" / "report.html").exists()
    model = load_model(tmp_path / "m.pt")
    assert _kept(model) == [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    out = model.eval()(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 10)
    assert cli("train", "--arch", "zoo:resnet8", "--train-data", "digits", "-o", tmp_path / "m.pt").code != 0  # exists


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--arch", "no_such_module_xyz:build"], "no_such_module_xyz"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--target-macs", "1.5"], "target-macs"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--target-macs", "0"], "target-macs"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--grow-batch", "--max-batch", "16"], "cannot grow"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--grow-batch", "--batch-size", "5000"], "cannot grow"),
        (["--arch", "zoo:resnet8", "--grow-batch"], "grow-batch"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--cost-weight", "-1"], "cost-weight"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--cost-weight", "9"], "cost-weight"),
        (["--arch", "zoo:resnet8", "-m", "channel-union", "--min-channels", "0"], "min-channels"),
        (["--arch", "zoo:resnet8", "--compare-dense"], "compare-dense"),
        ([], "--arch"),
    ],
)
def test_refusals_are_one_line(tmp_path, cli, args, said):
    res = cli("train", *args, "--train-data", "digits?limit=200", "--epochs", "1", "-o", tmp_path / "m.pt")
    assert one_line_error(res), res.err
    assert said in res.err
    assert not (tmp_path / "m.pt").exists()


def test_dense_training_learns_and_records_each_epoch(digits):
    x, y = digits
    torch.manual_seed(0)
    model = create_model("lenet300", input_size=8)
    val = TensorData(x[:64], y[:64])
    rep = train_model(model, (x, y), val=val, epochs=3, batch_size=32, lr=0.2).report
    assert [e["epoch"] for e in rep["epochs"]] == [1, 2, 3] and not rep["reconfigurations"]
    assert rep["epochs"][-1]["loss"] < rep["epochs"][0]["loss"]
    assert rep["final"]["val_score"] > 50 and rep["final"]["macs_fraction"] == 1.0
    assert rep["total"]["cpu_s"] > 0
    assert rep["total"]["cpu_s"] == pytest.approx(sum(e["cpu_s"] for e in rep["epochs"]), abs=0.01)


def test_random_shift_of_one_channel_images_has_plain_strides():
    """One-channel shifted images once kept strides that also read as channels-last; oneDNN's convolution
    backward then corrupted the heap on a model pruned to odd channel counts (a crash mid-training)."""
    from compress.train import random_shift

    x = torch.randn(4, 1, 12, 12)
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.stride() == (144, 144, 12, 1)
    assert torch.equal(random_shift(x, 0, torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_small", "lenet5", "vgg_small"])
def test_the_whole_tensor_proximal_step_matches_the_slice_by_slice_one(name):
    """GroupLasso.prox works on whole tensors; it must shrink exactly what group_norms reads and scale_channels
    scales (depthwise convs, a flatten into a linear layer, residual stages)."""
    from compress.prune.channel_union import GroupLasso
    from compress.prune.graph import group_norms, scale_channels

    torch.manual_seed(0)
    kw = {"input_size": 16} if name.startswith("lenet") else {}
    model = create_model(name, num_classes=10, in_channels=1, **kw)
    for p in model.parameters():  # BatchNorm scales away from 1, so that every slice counts
        p.data.normal_(0, 0.5)
    ref = copy.deepcopy(model)
    shape = (1, 1, 16, 16)
    lasso, ref_lasso = GroupLasso(model, shape), GroupLasso(ref, shape)
    assert lasso.groups
    lasso.prox(0.9)
    with torch.no_grad():
        for cg in ref_lasso.groups:
            norm = group_norms(cg.group, cg.size).sqrt()
            live = norm[norm > 0]
            scale_channels(cg.group, torch.clamp(1 - 0.9 * live.mean() / norm.clamp_min(1e-12), min=0.0))
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    after = [group_norms(cg.group, cg.size) for cg in lasso.groups]
    assert any(bool((n == 0).any()) for n in after)  # channels reached zero: the comparison means something
    assert not all(bool((n == 0).all()) for n in after)


@pytest.mark.parametrize("what", ["MACs", "parameters"])
def test_channel_costs_are_what_removing_one_channel_saves(what):
    """The estimate that keeps a reconfiguration above its target: removing one channel of a group saves
    exactly its cost (no conv of a ResNet has its input and output channels in the same group)."""
    from compress.counting import count_macs, count_params
    from compress.prune.channel_union import GroupLasso
    from compress.prune.graph import prune_group
    from compress.prune.slices import channel_costs

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1, width=0.5)
    shape = (1, 1, 16, 16)
    measure = (lambda m: count_macs(m, shape)) if what == "MACs" else count_params
    lasso = GroupLasso(model, shape)
    costs = channel_costs(model, lasso.groups, shape, what)
    base = measure(model)
    for i, cg in enumerate(lasso.groups):
        m = copy.deepcopy(model)
        groups = GroupLasso(m, shape)
        assert prune_group(groups.dg, groups.groups[i], [1], m, shape) is None
        assert base - measure(m) == costs[i][1] > 0, cg.name


def _zero_channels(block, channels):
    with torch.no_grad():
        block.conv1.weight[channels] = 0
        block.bn1.weight[channels] = 0
        block.bn1.bias[channels] = 0
        block.conv2.weight[:, channels] = 0


def test_a_reconfiguration_carries_sgds_momentum_to_the_kept_channels(digits):
    x, y = digits
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1, width=0.5)
    pruner = ChannelUnionPruner(model, ChannelUnionConfig(lasso_ratio=0.1), Context(train=(x, y)), interval=0)
    pruner.attach()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for i in range(0, 96, 32):
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        opt.step()
        opt.zero_grad()
    blk = model.layer1[0]
    _zero_channels(blk, [0, 2])
    kept = [c for c in range(blk.conv1.out_channels) if c not in (0, 2)]
    old = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    removed = pruner.reconfigure(opt)
    assert removed == {"layer1.0.conv1": 2}
    params = dict(pruner.model.named_parameters())
    assert [p for g in opt.param_groups for p in g["params"]] == list(params.values())
    state = {n: opt.state[p]["momentum_buffer"] for n, p in params.items()}
    assert torch.equal(state["layer1.0.conv1.weight"], old["layer1.0.conv1.weight"][kept])
    assert torch.equal(state["layer1.0.bn1.bias"], old["layer1.0.bn1.bias"][kept])
    assert torch.equal(state["layer1.0.conv2.weight"], old["layer1.0.conv2.weight"][:, kept])
    assert torch.equal(state["fc.weight"], old["fc.weight"])
    assert all(p.grad is None for p in params.values())
    nn.functional.cross_entropy(pruner.model(x[:32]), y[:32]).backward()
    opt.step()  # the optimizer steps the smaller model


def test_zeros_that_would_overshoot_the_target_stay_and_the_rest_goes_by_l1(digits):
    """A strong pull zeroes many channels at once: without a target the first reconfiguration that removes
    anything goes far below 0.7 of the MACs; with target 0.7 no reconfiguration goes below it."""
    x, y = digits
    torch.manual_seed(0)
    start = create_model("resnet8", num_classes=10, in_channels=1, width=0.5)
    kw = {"epochs": 1.5, "batch_size": 32, "lr": 0.1, "lasso_ratio": 6, "reconfig_every": 0.5, "freeze_last": 0.0}
    free = train_model(copy.deepcopy(start), (x, y), method="channel-union", **kw).report
    base = free["start"]["macs"]
    first = next(r for r in free["reconfigurations"] if r["removed_channels"] or r["removed_branches"])
    assert first["macs"] / base < 0.6
    held = train_model(copy.deepcopy(start), (x, y), method="channel-union", target_macs=0.7, **kw).report
    fracs = [r["macs"] / base for r in held["reconfigurations"]]
    assert fracs and min(fracs) >= 0.7 * 0.99
    assert abs(held["final"]["macs_fraction"] - 0.7) <= 0.7 * 0.02


def test_cost_weight_pulls_the_costly_channels_harder():
    """cost_weight a: each group's proximal step is scaled by (its channels' MACs / the mean channel's) ** a."""
    from compress.prune.channel_union import GroupLasso
    from compress.prune.graph import group_norms
    from compress.prune.slices import channel_costs

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1, width=0.5)
    shape = (1, 1, 16, 16)
    assert GroupLasso(model, shape).weights == [1.0] * len(GroupLasso(model, shape).groups)
    lasso = GroupLasso(model, shape, cost_weight=1.0)
    costs = [float(c.mean()) for c in channel_costs(model, lasso.groups, shape, "MACs")]
    sizes = [cg.size for cg in lasso.groups]
    assert sum(w * n for w, n in zip(lasso.weights, sizes, strict=True)) == pytest.approx(sum(sizes))
    by_name = dict(zip([cg.name for cg in lasso.groups], lasso.weights, strict=True))
    assert by_name["conv1"] == max(lasso.weights) > 1 > by_name["layer3.0.conv1"]  # 16 x 16 stage vs 4 x 4
    assert max(lasso.weights) / min(lasso.weights) == pytest.approx(max(costs) / min(costs))
    before = [group_norms(cg.group, cg.size).detach().sqrt() for cg in lasso.groups]
    lasso.prox(1e-3)
    for cg, b, w in zip(lasso.groups, before, lasso.weights, strict=True):
        after = group_norms(cg.group, cg.size).detach().sqrt()
        assert torch.allclose(b - after, torch.full_like(b, 1e-3 * w * float(b.mean())), rtol=1e-3), cg.name


def test_min_channels_keeps_that_many_channels_in_every_group(digits):
    """A strong pull takes some residual stream or inner conv down to one channel with ``min_channels=1``; the
    default keeps two, ``min_channels=4`` four, in every group it prunes (the reconfiguration keeps the strongest)."""
    x, y = digits
    torch.manual_seed(0)
    start = create_model("resnet8", num_classes=10, in_channels=1, width=0.5)
    kw = {"epochs": 1.5, "batch_size": 32, "lr": 0.1, "lasso_ratio": 6, "reconfig_every": 0.5, "freeze_last": 0.0}

    def widths(**extra):
        res = train_model(copy.deepcopy(start), (x, y), method="channel-union", **kw, **extra)
        convs = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
        return convs, res.report

    one, _ = widths(min_channels=1)
    default, rep = widths()
    held, rep4 = widths(min_channels=4)
    assert min(one) == 1  # the test would say nothing otherwise
    assert min(default) >= 2 and rep["settings"]["min_channels"] == 2
    assert min(held) >= 4 and rep4["settings"]["min_channels"] == 4
