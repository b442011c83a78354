"""The first-order Taylor importance: the channels it removes are those whose removal changes the loss least
to first order, computed here independently from a full-batch gradient."""

import copy

import pytest
import torch
import torch.nn.functional as F

from compress.config import FineTune
from compress.method import Context, run
from compress.models import create_model
from compress.prune import L1FilterConfig
from compress.prune.taylor import ATTR, SAMPLES


def _kept_filters(before, after, layer):
    """Indices of ``layer``'s filters that survived (matched by value)."""
    wb, wa = getattr(before, layer).weight.flatten(1), getattr(after, layer).weight.flatten(1)
    return sorted(int((wb - r).abs().sum(1).argmin()) for r in wa)


def test_taylor_removes_the_filters_of_least_first_order_loss_change(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    x, y = tr.x[:300], tr.y[:300]
    assert len(x) <= SAMPLES  # every sample is used, so the gradient is the full-batch one
    ref = copy.deepcopy(lenet5_trained).eval()
    F.cross_entropy(ref(x), y, reduction="sum").backward()
    w, g = ref.conv2.weight, ref.conv2.weight.grad
    saliency = ((w * g).flatten(1).sum(1) + ref.conv2.bias * ref.conv2.bias.grad).abs()
    expected = sorted(saliency.argsort(descending=True)[:42].tolist())

    m = copy.deepcopy(lenet5_trained)
    bn_free = {k: v.clone() for k, v in m.state_dict().items()}
    res = run(
        "prune",
        m,
        L1FilterConfig(ratio={"conv2": 8, "_default": 0}, importance="taylor", finetune=FineTune(epochs=0)),
        Context(train=(x, y)),
    )
    assert res.model.conv2.out_channels == 42  # 8 removed
    assert _kept_filters(lenet5_trained, res.model, "conv2") == expected
    l1_kept = sorted(lenet5_trained.conv2.weight.abs().flatten(1).sum(1).argsort(descending=True)[:42].tolist())
    assert expected != l1_kept  # the test tells the two criteria apart on this model
    # nothing left behind: no saliencies, no gradients, parameters trainable as before
    assert not any(ATTR in mod.__dict__ for mod in res.model.modules())
    assert all(p.grad is None and p.requires_grad for p in res.model.parameters())
    assert torch.equal(res.model.conv1.weight, bn_free["conv1.weight"])


def test_taylor_with_batchnorm_and_a_target_leaves_statistics_alone():
    """On a residual net the search prunes copies: the scores travel with them; running statistics and
    train/eval mode are untouched by the gradient pass."""
    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1).train()
    x, y = torch.randn(128, 1, 32, 32), torch.randint(0, 10, (128,))
    tracked = [int(b.num_batches_tracked) for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    res = run(
        "prune",
        m,
        L1FilterConfig(target_macs=0.6, importance="taylor", finetune=FineTune(epochs=0)),
        Context(train=(x, y)),
    )
    assert tracked == [int(b.num_batches_tracked) for b in res.model.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert res.records and abs(res.records[0]["reached"] - 0.6) < 0.03
    assert not any(ATTR in mod.__dict__ for mod in res.model.modules())


def test_taylor_needs_training_data(cli, tmp_path, lenet5_trained):
    from compress.errors import UsageError
    from compress.model_io import save_model

    with pytest.raises(UsageError, match="training data"):
        run(
            "prune",
            copy.deepcopy(lenet5_trained),
            L1FilterConfig(ratio=0.5, importance="taylor"),
            Context(input_shape=(1, 1, 28, 28)),
        )
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "prune",
        tmp_path / "m.pt",
        "-m",
        "l1-filter",
        "--importance",
        "taylor",
        "--epochs",
        "0",
        "-o",
        tmp_path / "p.pt",
    )
    assert r.code != 0 and "--train-data" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli(
        "prune",
        tmp_path / "m.pt",
        "-m",
        "l1-filter",
        "--importance",
        "taylor",
        "--ratio",
        "0.25",
        "--epochs",
        "0",
        "--train-data",
        "mnist5k?limit=300",
        "--no-latency",
        "-o",
        tmp_path / "p.pt",
    )
    assert r.code == 0, r.err
