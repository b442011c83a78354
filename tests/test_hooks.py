"""The hook objects inside a hand-written training loop (as users run their own)."""
import copy

import torch
import torch.nn.functional as F

from compress import masks
from compress.hooks import ChannelUnionPruner, KMeansFinetuner, ThresholdPruner
from compress.metrics import count_params
from compress.prune import ChannelUnionConfig, ThresholdConfig, sparsity_of
from compress.quantize import QuantConfig, codes_of


def _batches(ds, bs=32, epochs=1):
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(ds), generator=g)
        for i in range(0, len(ds), bs):
            idx = perm[i:i + bs]
            yield ds.x[idx], ds.y[idx]


def test_threshold_pruner_in_own_loop(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    tr = tr.subset(range(640))
    m = copy.deepcopy(lenet5_trained)
    pruner = ThresholdPruner(m, ThresholdConfig(sparsity=0.9, steps=2), steps_per_round=10)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for x, y in _batches(tr, epochs=1):  # 20 steps: round 1 at step 0, round 2 at step 10
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.after_backward()
        opt.step()
        pruner.step()
        zero_now = {n: (p == 0) for n, p in m.named_parameters() if p.dim() > 1}
    assert pruner.round == 2 and masks.has_masks(m)
    m = pruner.apply()
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
    pruner = ChannelUnionPruner(m, ChannelUnionConfig(lasso_ratio=3.0), (1, 1, 8, 8), interval=20)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    changed = 0
    for x, y in _batches(ds, bs=16, epochs=2):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner.step(lr=0.05):
            changed += 1
            opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)  # new parameters
    assert changed >= 1 and count_params(pruner.apply()) < p0
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert float(pruner.penalty()) >= 0


def test_kmeans_finetuner_in_own_loop(lenet5_trained, mnist_small):
    tr, _ = mnist_small
    m = copy.deepcopy(lenet5_trained)
    ft = KMeansFinetuner(m, QuantConfig(bits=3, scheme="kmeans"))
    before = {n: mod.compress_quant["codebook"].clone() for n, mod in m.named_modules()
              if hasattr(mod, "compress_quant")}
    opt = torch.optim.Adam(ft.parameters(), lr=1e-3)
    for x, y in _batches(tr.subset(range(320))):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        ft.after_backward()
        opt.step()
        ft.step()
    m = ft.apply()
    moved = False
    for n, mod in m.named_modules():
        if hasattr(mod, "compress_quant"):
            codes_of(mod)  # still exactly on its (trained) codebook
            moved |= not torch.equal(mod.compress_quant["codebook"], before[n])
    assert moved
