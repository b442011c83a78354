"""The data users have: an image folder against the same digits in memory (the same result), bounded memory
on 100,000 images, a loader that keeps up with ResNet-20, and what distillation buys back."""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.conftest import VAL_FRACTION, once, record, trained
from compress import data as data_mod
from compress.config import FineTune
from compress.method import prune_
from compress.prune import L1FilterConfig
from compress.scoring import evaluate
from compress.train import fit

BIN = Path(sys.executable).parent


def write_png_folder(data, root: Path, n: int | None = None) -> Path:
    """``root/<label>/<i>.png`` (grey, lossless) for ``n`` samples of a TensorData, cycling through it; file
    names keep the sample order within a class, so a stratified split picks the same samples as in memory."""
    from PIL import Image

    n = len(data) if n is None else n
    x8 = (data.x[:, 0] * 255).round().to(torch.uint8).numpy()
    for c in range(int(data.y.max()) + 1):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        j = i % len(data)
        Image.fromarray(x8[j], mode="L").save(root / str(int(data.y[j])) / f"{i:07d}.png", compress_level=1)
    return root


@pytest.mark.slow
def test_pipeline_folder_same_as_memory(benchmark, eval_sets, tmp_path):
    """A short Deep Compression recipe on LeNet-5 with mnist5k in memory and with the same digits as a PNG folder:
    the split
    holds the same samples in the same order, so the ratio and the accuracy must agree."""
    from compress.recipe import Recipe
    from compress.search import pipeline

    test, ev = eval_sets[28]
    base = trained("lenet5", 15)
    mem = data_mod.load("mnist5k")
    folder = data_mod.load(f"folder:{write_png_folder(mem, tmp_path / 'png')}")
    recipe = Recipe.from_dict(
        {
            "stage": [  # every candidate fine-tunes: the folder is read for every epoch
                {"method": "threshold", "sparsity": [0.7, 0.8, 0.9], "rounds": 2, "finetune": {"epochs": 4}},
                {
                    "method": "quantize",
                    "scheme": "kmeans",
                    "bits": [{"conv": 6, "linear": 4}, {"conv": 5, "linear": 3}],
                    "finetune": {"epochs": 0.5},
                },
            ]
        }
    )
    res = {}
    for name, ds in (("memory", mem), ("folder", folder)):
        t0 = time.perf_counter()
        m, s = pipeline(
            copy.deepcopy(base), ds, recipe, max_accuracy_drop=0.5, val_fraction=VAL_FRACTION, latency=False
        )
        res[name] = {
            "ratio": s.ratio,
            "val_accuracy": s.final_accuracy,
            "test_accuracy": evaluate(m, test),
            "cpz_bytes": s.cpz_bytes,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    once(benchmark, lambda: None)
    record(
        benchmark,
        ratio=res["folder"]["ratio"],
        accuracy=res["folder"]["test_accuracy"],
        base_accuracy=evaluate(base, test),
        latency_ms=0.0,
        eval_name=ev,
        memory=res["memory"],
        folder=res["folder"],
    )
    assert abs(res["folder"]["ratio"] - res["memory"]["ratio"]) <= 0.02 * res["memory"]["ratio"]
    assert abs(res["folder"]["test_accuracy"] - res["memory"]["test_accuracy"]) <= 0.3


def _peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB of the command and the processes it waited for, seconds) of ``compress ARGS``."""
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(BIN / "compress"), *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[-1]) / 1024, time.perf_counter() - t0


@pytest.mark.slow
def test_folder_memory_is_bounded(benchmark, tmp_path):
    """`report` and a 1-epoch `prune --train-data` on 100,000 and on 10,000 PNG digits: peak RSS under
    1.5 GB and nearly the same for both (memory holds the file list and a few batches, not the images)."""
    model = tmp_path / "lenet300.pt"
    from compress.model_io import save_model

    save_model(trained("lenet300", 15), model)
    mem = data_mod.load("mnist5k")
    rss = {}
    for n in (10_000, 100_000):
        root = write_png_folder(mem, tmp_path / f"png{n}", n)
        spec = f"folder:{root}?workers=2"
        rep, t_rep = _peak_rss_mb(["report", str(model), "--data", spec, "--no-latency"])
        pr, t_pr = _peak_rss_mb(
            [
                "prune",
                str(model),
                "--sparsity",
                "0.9",
                "--rounds",
                "1",
                "--epochs",
                "1",
                "--train-data",
                spec,
                "--no-latency",
                "-o",
                str(tmp_path / f"p{n}.pt"),
            ]
        )
        rss[n] = {
            "report_mb": round(rep),
            "prune_mb": round(pr),
            "report_s": round(t_rep, 1),
            "prune_s": round(t_pr, 1),
        }
    once(benchmark, lambda: None)
    benchmark.extra_info.update(images={str(k): v for k, v in rss.items()})
    for k in ("report_mb", "prune_mb"):
        assert rss[100_000][k] < 1536
        assert rss[100_000][k] < 1.25 * rss[10_000][k] + 64  # does not grow with the number of images


@pytest.mark.slow
def test_folder_loader_keeps_up(benchmark, tmp_path):
    """One fine-tuning epoch of ResNet-20 on 32x32 digits from a PNG folder with 2 loader processes, against
    the same epoch on the digits in memory: at most 1.5x its time."""
    mem = data_mod.load("mnist5k?size=32")
    folder = data_mod.load(f"folder:{write_png_folder(mem, tmp_path / 'png')}?workers=2")
    base = trained("resnet20", 4, size=32, lr=2e-3)
    tr_mem, _ = data_mod.split(mem, VAL_FRACTION)
    tr_dir, _ = data_mod.split(folder, VAL_FRACTION)
    fit(copy.deepcopy(base), tr_mem, FineTune(epochs=0.05))  # warm-up
    secs = {}
    for name, d in (("memory", tr_mem), ("folder", tr_dir)):
        t0 = time.perf_counter()
        fit(copy.deepcopy(base), d, FineTune(epochs=1, lr=1e-3))
        secs[name] = round(time.perf_counter() - t0, 1)
    once(benchmark, lambda: None)
    ratio = secs["folder"] / secs["memory"]
    benchmark.extra_info.update(seconds=secs, folder_over_memory=round(ratio, 3), samples=len(tr_mem))
    assert ratio <= 1.5


DISTILL = {
    "lenet5": dict(epochs=15, size=28, seeds=(0, 1, 2)),
    "resnet20": dict(epochs=4, size=32, lr=2e-3, seeds=(0, 1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DISTILL))
def test_distillation_at_fixed_compression(benchmark, eval_sets, name):
    """L1-filter pruning at ratio 0.5 with 3 epochs of fine-tuning, with and without distillation from the
    input model (T = 4, half the loss), over seeds: the test accuracy each recovers."""
    spec = DISTILL[name]
    size = spec["size"]
    test, ev = eval_sets[size]
    base = trained(name, spec["epochs"], size=size, lr=spec.get("lr", 1e-3))
    tr, va = data_mod.split(data_mod.load("mnist5k" + (f"?size={size}" if size != 28 else "")), VAL_FRACTION)
    shape = (1, 1, size, size)
    acc = {"task loss": [], "distill T=4": []}
    for seed in spec["seeds"]:
        for label, distill in (("task loss", None), ("distill T=4", 4.0)):
            cfg = L1FilterConfig(ratio=0.5, finetune=FineTune(epochs=3, augment=None, distill=distill, seed=seed))
            m = prune_(copy.deepcopy(base), cfg, tr, va, input_shape=shape)
            acc[label].append(round(evaluate(m, test), 3))
    once(benchmark, lambda: None)
    summary = {
        k: {"mean": round(statistics.mean(v), 3), "min": min(v), "max": max(v), "runs": v} for k, v in acc.items()
    }
    record(
        benchmark,
        ratio=0.0,
        accuracy=summary["distill T=4"]["mean"],
        base_accuracy=evaluate(base, test),
        latency_ms=0.0,
        eval_name=ev,
        distillation=summary,
        gain_pt=round(summary["distill T=4"]["mean"] - summary["task loss"]["mean"], 3),
    )
