"""Wall time of the CLI's fine-tuning on 1 and 2 processes (torchrun, gloo on CPU)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.conftest import trained
from compress.model_io import load_model
from compress.prune import sparsity_of


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_threshold_finetune_1_vs_2_processes(benchmark, tmp_path):
    from compress.model_io import save_model

    src = tmp_path / "lenet5.pt"
    save_model(trained("lenet5", 15), src)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cli = str(Path(sys.executable).parent / "compress")
    times, sparsity = {}, {}
    env = {**os.environ, "COMPRESS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def run(n):
        out = tmp_path / f"p{n}.pt"
        t0 = time.perf_counter()
        subprocess.run(
            [
                torchrun,
                f"--nproc-per-node={n}",
                f"--master-port={_port()}",
                cli,
                "prune",
                str(src),
                "--sparsity",
                "0.9",
                "--train-data",
                "mnist5k",
                "--epochs",
                "3",
                "-o",
                str(out),
            ],
            check=True,
            env=env,
            capture_output=True,
        )
        times[n] = time.perf_counter() - t0
        sparsity[n] = sparsity_of(load_model(out))

    benchmark.pedantic(lambda: [run(n) for n in (1, 2)], rounds=1, iterations=1)
    benchmark.extra_info.update(
        compression_ratio=round(1 / (1 - sparsity[2]), 3),
        accuracy=None,
        accuracy_drop=None,
        latency_ms=None,
        wall_s_1_process=round(times[1], 2),
        wall_s_2_processes=round(times[2], 2),
        speedup=round(times[1] / times[2], 3),
    )
    assert abs(sparsity[1] - sparsity[2]) < 0.002
