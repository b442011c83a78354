"""Shared fixtures for the benchmarks: trained models (cached on disk) and the evaluation set.

Accuracy is judged on the official MNIST test set at ../shared/data/mnist (or $COMPRESS_MNIST_TEST)
when it is there; otherwise on the 20% of the embedded mnist5k digits that no model here trains on,
and ``extra_info["eval_data"]`` says which.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("COMPRESS_PROGRESS", "0")

import pytest
import torch

from compress import data as data_mod
from compress.config import FineTune
from compress.meta import set_meta
from compress.model_io import load_model, save_model
from compress.models import create_model
from compress.train import fit

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache"
VAL_FRACTION = 0.2
torch.set_num_threads(2)


def mnist_test_dir() -> Path | None:
    if os.environ.get("COMPRESS_BENCH_EVAL") == "heldout":  # as in the CI baseline
        return None
    env = os.environ.get("COMPRESS_MNIST_TEST")
    for p in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data" / "mnist"]:
        if p.is_dir() and any(p.glob("*images-idx3-ubyte*")):
            return p
    return None


@pytest.fixture(scope="session")
def eval_sets():
    """spec suffix -> (Dataset, name); 28x28 and 32x32 variants."""
    d = mnist_test_dir()
    out = {}
    for size in (28, 32):
        opt = f"?size={size}" if size != 28 else ""
        if d is not None:
            out[size] = (data_mod.load(f"{d}{opt}"), "mnist-test")
        else:
            _, held = data_mod.split(data_mod.load(f"mnist5k{opt}"), VAL_FRACTION, seed=0)
            out[size] = (held, "mnist5k-heldout")
    return out


def trained(name: str, epochs: float, size: int = 28, lr: float = 1e-3, augment: int = 2, **kw) -> torch.nn.Module:
    """Train (or load from .bench-cache) a zoo model on the training part of mnist5k, as
    `compress zoo train` does (random shifts of 2 px)."""
    tag = "-".join(
        [name, f"e{epochs}", f"s{size}", f"lr{lr}", f"a{augment}"] + [f"{k}{v}" for k, v in sorted(kw.items())]
    )
    path = CACHE / f"{tag}.pt"
    if path.exists():
        return load_model(path)
    CACHE.mkdir(exist_ok=True)
    spec = "mnist5k" + (f"?size={size}" if size != 28 else "")
    tr, _ = data_mod.split(data_mod.load(spec), VAL_FRACTION, seed=0)
    torch.manual_seed(0)
    if name.startswith("lenet"):
        kw.setdefault("input_size", size)
    m = create_model(name, **kw)
    fit(m, tr, FineTune(epochs=epochs, lr=lr, augment=augment))
    set_meta(m, input_shape=[1, 1, size, size], val_fraction=VAL_FRACTION, train_data=spec, augment=augment)
    save_model(m, path, force=True)
    return m


def train_split(size: int = 28):
    spec = "mnist5k" + (f"?size={size}" if size != 28 else "")
    return data_mod.split(data_mod.load(spec), VAL_FRACTION, seed=0)


def record(
    benchmark, *, ratio: float, accuracy: float, base_accuracy: float, latency_ms: float, eval_name: str, **extra
) -> None:
    benchmark.extra_info.update(
        compression_ratio=round(ratio, 3),
        accuracy=round(accuracy, 3),
        accuracy_drop=round(base_accuracy - accuracy, 3),
        latency_ms=round(latency_ms, 4),
        base_accuracy=round(base_accuracy, 3),
        eval_data=eval_name,
        **extra,
    )


def once(benchmark, fn):
    """Time one full run (compression is not a micro-benchmark)."""
    return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)


@pytest.fixture
def fresh():
    return copy.deepcopy
