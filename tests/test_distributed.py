"""Fine-tuning on 2 CPU processes (gloo over localhost) gives the same result on every rank."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress import data as data_mod
from compress.config import FineTune
from compress.counting import count_params
from compress.method import Context, run
from compress.models import create_model
from compress.prune import ChannelUnionConfig, ThresholdConfig, prune_, sparsity_of
from compress.scoring import evaluate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrained(path):
    """A trained starting point, made once in the test process (fine-tuning starts from a trained model)."""
    from compress.config import FineTune
    from compress.train import fit

    ds = data_mod.load("digits")
    tr, _ = data_mod.split(ds, 0.2, seed=0)
    torch.manual_seed(0)
    m = create_model("lenet300", input_size=8)
    fit(m, tr, FineTune(epochs=4, lr=3e-3))
    torch.save(m.state_dict(), path)


def _job(method: str, start=None):
    ds = data_mod.load("digits")
    tr, va = data_mod.split(ds, 0.2, seed=0)
    torch.manual_seed(0)
    if method == "threshold":
        m = create_model("lenet300", input_size=8)
        m.load_state_dict(torch.load(start, weights_only=True))
        prune_(m, ThresholdConfig(sparsity=0.8, rounds=2, finetune=FineTune(epochs=2, lr=1e-3)), tr, va)
    else:
        m = create_model("resnet8", width=0.5)
        cfg = ChannelUnionConfig(
            lasso_ratio=1.5, finetune=FineTune(epochs=3, lr=0.02, optimizer="sgd", batch_size=16, augment=0)
        )
        res = run("prune", m, cfg, Context(train=tr, val=va, input_shape=(1, 1, 8, 8)))
        m.reconfigurations = res.records  # for the test to read back
    return m, va


def _worker(rank, world, port, method, out_dir, start):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m, _ = _job(method, start)
        torch.save(m, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_ddp(method, tmp_path, start):
    mp.spawn(_worker, args=(2, _free_port(), method, str(tmp_path), start), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("method", ["threshold", pytest.param("channel-union", marks=pytest.mark.slow)])  # 30 s: bench
def test_two_processes_match_one(tmp_path, method):
    start = str(tmp_path / "start.pt")
    _pretrained(start)
    r0, r1 = _run_ddp(method, tmp_path, start)
    s0, s1 = r0.state_dict(), r1.state_dict()
    assert list(s0) == list(s1)
    for k in s0:  # identical weights (and BatchNorm statistics) on both ranks
        assert torch.equal(s0[k], s1[k]), k
    single, va = _job(method, start)
    if method == "threshold":
        assert abs(sparsity_of(r0) - sparsity_of(single)) < 0.002  # the same final sparsity
        assert abs(evaluate(r0, va) - evaluate(single, va)) < 3.0  # accuracy within noise
        assert evaluate(r0, va) > 85
    else:
        recs = r0.reconfigurations
        assert len(recs) == 4  # reconfigured under DDP after every epoch, the model rebuilt each time
        assert count_params(r0) < recs[0]["params"]
        assert r0(torch.randn(2, 1, 8, 8)).shape == (2, 10)
