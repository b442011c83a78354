"""torch.distributed glue: compress's fine-tuning under ``torchrun`` (gloo on CPU, nccl on GPU).

``fit`` wraps the model in DistributedDataParallel when a process group is up, shards the data
DistributedSampler-style (the same seeded permutation on every rank, padded so every rank takes the
same number of steps) and shows progress on rank 0 only. Masks, proximal steps and
reconfigurations are deterministic functions of the (all-reduced, hence identical) weights, so
every rank makes the same decisions. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def init_from_env(device: str = "cpu") -> bool:
    """Start the process group if launched by torchrun (WORLD_SIZE > 1). Returns whether it did."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def wrap(model: nn.Module) -> nn.Module:
    """DDP around ``model`` when distributed, else the model itself."""
    if not is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: DDP syncs them only at each forward."""
    if is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)
