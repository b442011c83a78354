"""Compression inside your own training loop, on one process or many.

    python docs/examples/own_loop_ddp.py                                  # one process
    torchrun --nproc-per-node 2 docs/examples/own_loop_ddp.py             # two (gloo on CPU)

Threshold pruning with masks held by your optimizer loop, then k-means weight sharing with centroid
fine-tuning, then a .cpz written by rank 0. Under DDP the gradients are all-reduced, so every
rank's masks and codebooks are identical.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from compress import QuantConfig, Quantizer, ThresholdConfig, ThresholdPruner, create_model, data, evaluate, save_cpz
from compress.prune import sparsity_of

distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

train, val = data.split(data.load("mnist5k"), 0.1)
torch.manual_seed(0)
model = create_model("lenet5")
net = DDP(model) if distributed else model


def batches(epochs, bs=64):
    g = torch.Generator().manual_seed(0)  # same order on every rank; each takes its shard
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)[rank::world]
        for i in range(0, len(perm) - bs + 1, bs):
            yield train.x[perm[i:i + bs]], train.y[perm[i:i + bs]]


opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for x, y in batches(3):  # your usual training
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()

# 1. iterative threshold pruning: three rounds, one epoch apart (an epoch is shorter on more ranks)
steps_per_epoch = len(train) // world // 64
pruner = ThresholdPruner(model, ThresholdConfig(sparsity=0.9, rounds=3), steps_per_round=steps_per_epoch)
pruner.attach()  # round 1: masks on
for x, y in batches(3):
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    pruner.after_backward()
    opt.step()
    pruner.step()
model = pruner.finalize()  # exact zeros, no masks left

# 2. k-means weight sharing; only the centroids train
ft = Quantizer(model, QuantConfig(bits={"conv": 6, "linear": 4}, scheme="kmeans"))
ft.attach()  # weights on their codebooks
copt = torch.optim.Adam(ft.parameters(), lr=1e-4)
for x, y in batches(1):
    copt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    ft.after_backward()
    copt.step()
    ft.step()
model = ft.finalize()

if rank == 0:
    stats = save_cpz(model, "lenet5-own-loop.cpz", force=True)
    print(f"sparsity {sparsity_of(model):.1%}, accuracy {evaluate(model, val):.2f}%, "
          f"{4 * sum(p.numel() for p in model.parameters()) / stats['file_bytes']:.1f}x smaller")
if distributed:
    dist.destroy_process_group()
