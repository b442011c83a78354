"""The method objects inside a hand-written training loop (as users run their own)."""

import copy

import torch
import torch.nn.functional as F

from compress import ChannelUnionPruner, Context, Quantizer, ThresholdPruner, masks
from compress.counting import count_params
from compress.prune import ChannelUnionConfig, ThresholdConfig, sparsity_of
from compress.quant_state import get_state, quantized_layers
from compress.quantize import QuantConfig


def _batches(ds, bs=32, epochs=1):
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(ds), generator=g)
        for i in range(0, len(ds), bs):
            idx = perm[i : i + bs]
            yield ds.x[idx], ds.y[idx]


def test_threshold_pruner_in_own_loop(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    tr = tr.subset(range(640))
    m = copy.deepcopy(lenet5_trained)
    pruner = ThresholdPruner(m, ThresholdConfig(sparsity=0.9, rounds=2), steps_per_round=10)
    pruner.attach()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for x, y in _batches(tr, epochs=1):  # 20 steps: round 1 at attach, round 2 at step 10
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.after_backward()
        opt.step()
        pruner.step()
        zero_now = {n: (p == 0) for n, p in m.named_parameters() if p.dim() > 1}
    assert pruner.round == 2 and masks.has_masks(m)
    m = pruner.finalize()
    assert not masks.has_masks(m) and abs(sparsity_of(m) - 0.9) < 0.01
    for n, p in m.named_parameters():  # what was pruned in the last round stayed zero
        if n in zero_now:
            assert torch.all(p[zero_now[n]] == 0)


def test_channel_union_pruner_reconfigures_and_optimizer_is_rebuilt():
    from compress import data as data_mod
    from compress.models import create_model

    ds = data_mod.load("digits")
    torch.manual_seed(0)
    m = create_model("resnet8", width=0.5)
    p0 = count_params(m)
    pruner = ChannelUnionPruner(
        m, ChannelUnionConfig(lasso_ratio=0.1), Context(input_shape=(1, 1, 8, 8)), interval=20, num_classes=10
    )
    pruner.attach()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    changed = 0
    for x, y in _batches(ds, bs=16, epochs=2):
        loss = F.cross_entropy(m(x), y)
        assert pruner.penalty() is None  # the proximal step is the penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner.step(lr=0.05):
            changed += 1
            opt = torch.optim.SGD(pruner.model.parameters(), lr=0.05, momentum=0.9)  # new parameters
    assert changed >= 1 and count_params(pruner.finalize()) < p0
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # BatchNorm statistics were re-estimated on the last batch before each reconfiguration, as the
    # library's loop does on its training data: eval-mode accuracy is far above chance (without the
    # re-estimation, the lagging statistics left this very run at 10%)
    m.eval()
    with torch.no_grad():
        acc = float((m(ds.x).argmax(1) == ds.y).float().mean())
    assert acc > 0.5


def test_library_and_own_loop_share_the_method(lenet5_trained, mnist_small):
    """The library's `prune_` drives the very ThresholdPruner a user's loop drives: same masks."""
    from compress.config import FineTune
    from compress.method import prune_

    a, b = copy.deepcopy(lenet5_trained), copy.deepcopy(lenet5_trained)
    cfg = ThresholdConfig(sparsity=0.8, rounds=2, finetune=FineTune(epochs=0))
    prune_(a, cfg)
    p = ThresholdPruner(b, cfg, steps_per_round=1)
    p.attach()
    p.step()
    p.finalize()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=False):
        assert torch.equal(pa == 0, pb == 0), n


def test_kmeans_quantizer_in_own_loop(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    m = copy.deepcopy(lenet5_trained)
    q = Quantizer(m, QuantConfig(bits=3, scheme="kmeans"))
    q.attach()
    before = {n: s.codebook.clone() for n, _, s in quantized_layers(m)}
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    for x, y in _batches(tr.subset(range(320))):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        q.after_backward()
        opt.step()
        q.step()
    m = q.finalize()
    moved = False
    for n, mod, state in quantized_layers(m):
        state.check(mod.weight, n)  # still exactly on its (trained) codebook
        assert torch.all(state.codebook[1:] >= state.codebook[:-1])  # sorted, the container's order
        moved |= not torch.equal(state.codebook, before[n])
    assert moved and get_state(m.fc1).bits == 3
