"""One runtime timed in a process of its own: ``python -m bench.runtime_worker RUNTIME PATH --shape 1,C,H,W``.

Two runtimes' thread pools in one process slow each other (FP32 PyTorch read 15x slower beside OpenVINO's), so
the INT8 bench starts one worker per runtime and asks each in turn for a round of timed calls: only one runs at
a time. ``RUNTIME`` is ``torch`` (a compress .pt, FP32 or INT8, loaded as data by ``compress.model_io.load_model``;
``--arch``: the user's classes it was saved from), ``ort`` (an .onnx, ONNX Runtime) or ``ov`` (an OpenVINO .xml);
its inputs are random, of ``--shape`` with the batch asked for. It loads the model once; then, one command a line
on stdin, one JSON line a reply on stdout:

    warm B           the first call at batch B (PT2E compiles there), then calls until the time of one is stable:
                     {"first_call_s", "compile_s" (PT2E's compile seconds, else null), "ms"}
    time B SECONDS   one round: a call untimed, then calls for SECONDS (at least MIN_CALLS): {"ms": their median,
                     "calls"}
    profile B CALLS  torch.profiler (CPU) over CALLS calls: {"ops": [[name, self ms a call, calls a call], ...]
                     by self time, "total_ms": self ms of a call over all ops}
    quit

``--kernel-profile`` compiles PT2E with inductor's kernels named in the profile (a worker for ``profile`` only:
the record calls it adds are not in any timed run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_CALLS = 3
MAX_BATCH = 1024
MAX_SECONDS = 60.0


def _load(runtime: str, path: str, arch: str | None, threads: int, shape: list[int]):
    """``call(batch) -> None`` running the model on a fixed random input of ``batch`` samples of ``shape``, and
    the torch model (None for ORT and OpenVINO)."""
    import numpy as np

    if runtime == "torch":
        import torch

        from compress.model_io import load_model

        torch.set_num_threads(threads)
        model = load_model(path, arch=arch).eval()
        inputs: dict = {}

        def call(b: int) -> None:
            if b not in inputs:  # one input a batch size, made before any timed call
                inputs[b] = torch.randn((b, *shape[1:]), generator=torch.Generator().manual_seed(b))
            with torch.no_grad():
                model(inputs[b])

        return call, model
    if runtime == "ort":
        from compress.export import _session

        sess = _session(path, threads)
        name = sess.get_inputs()[0].name
        arrays: dict = {}

        def call(b: int) -> None:
            if b not in arrays:
                arrays[b] = np.random.default_rng(b).standard_normal((b, *shape[1:]), dtype=np.float32)
            sess.run(None, {name: arrays[b]})

        return call, None
    if runtime == "ov":
        from compress import openvino_export as ov

        requests: dict = {}

        def call(b: int) -> None:
            if b not in requests:  # compiled for that batch (a static shape), as openvino_export times it
                x = np.random.default_rng(b).standard_normal((b, *shape[1:]), dtype=np.float32)
                requests[b] = (ov.compile_model(path, threads, b).create_infer_request(), x)
            request, x = requests[b]
            request.infer({0: x})

        return call, None
    raise SystemExit(f"runtime must be torch, ort or ov, got {runtime!r}")


def _ms(call, b: int) -> float:
    t0 = time.perf_counter()
    call(b)
    return (time.perf_counter() - t0) * 1000


def _profile(call, b: int, calls: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call(b)
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return {
        "ops": [[e.key, round(e.self_cpu_time_total / 1000 / calls, 4), round(e.count / calls, 2)] for e in rows],
        "total_ms": round(sum(e.self_cpu_time_total for e in rows) / 1000 / calls, 4),
    }


def _batch(word: str) -> int:
    b = int(word)
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"batch {b} out of 1..{MAX_BATCH}")
    return b


def serve(call, model, inp, out) -> None:
    from compress.measure import _warm_up

    for line in inp:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return
        if words[0] == "warm" and len(words) == 2:
            b = _batch(words[1])
            first = _ms(call, b) / 1000
            compiled = getattr(model, "compile_seconds", {}) if model is not None else {}
            key = next((k for k in compiled if k.startswith(f"{b}x")), None)
            reply = {
                "first_call_s": round(first, 3),
                "compile_s": compiled.get(key) if key else None,
                "ms": round(_warm_up(functools.partial(_ms, call, b)), 4),
            }
        elif words[0] == "time" and len(words) == 3:
            b, seconds = _batch(words[1]), min(MAX_SECONDS, max(0.0, float(words[2])))
            call(b)  # back from idle: the thread pool and caches
            times, deadline = [], time.perf_counter() + seconds
            while len(times) < MIN_CALLS or time.perf_counter() < deadline:
                times.append(_ms(call, b))
            reply = {"ms": round(statistics.median(times), 5), "calls": len(times)}
        elif words[0] == "profile" and len(words) == 3:
            b, n = _batch(words[1]), max(1, min(1000, int(words[2])))
            call(b)
            reply = _profile(call, b, n)
        else:
            raise ValueError(f"unknown command {line.strip()[:80]!r}")
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runtime", choices=("torch", "ort", "ov"))
    p.add_argument("path")
    p.add_argument("--shape", required=True, help="the input's shape, 1,C,H,W")
    p.add_argument("--arch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel-profile", action="store_true")
    a = p.parse_args(argv)
    # replies alone on stdout: whatever a library prints (torchao, OpenVINO, warnings) goes to stderr
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if a.kernel_profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    words = a.shape.split(",")
    if not (2 <= len(words) <= 5 and all(w.isdigit() and 0 < int(w) < 1 << 16 for w in words)):
        raise SystemExit(f"--shape: not a shape such as 1,3,32,32: {a.shape[:40]!r}")
    shape = [int(w) for w in words]
    call, model = _load(a.runtime, a.path, a.arch, a.threads, shape)
    out.write(json.dumps({"ready": True}) + "\n")
    serve(call, model, sys.stdin, out)


# --- the parent's side ---------------------------------------------------------------------------------------


class Worker:
    """A worker process of one runtime: started (loaded, answering), asked one command at a time, ended."""

    def __init__(
        self, runtime: str, path, shape, arch: str | None = None, threads: int = 2, kernel_profile: bool = False
    ):
        self.name = f"{runtime} {Path(path).name}"
        argv = [sys.executable, "-m", "bench.runtime_worker", runtime, str(path), "--threads", str(threads)]
        argv += ["--shape", ",".join(str(d) for d in shape)]
        argv += (["--arch", arch] if arch else []) + (["--kernel-profile"] if kernel_profile else [])
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, cwd=ROOT, env=env
        )
        self.ask(None)  # {"ready": true} once loaded

    def ask(self, command: str | None, timeout: float = 900.0) -> dict:
        """The reply to ``command`` (None: the next reply); the worker's last words when it has ended."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            self.err.seek(0)
            tail = self.err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"runtime worker {self.name} gave no answer to {command!r}: " + " / ".join(tail))
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def warm(workers: dict[str, Worker], batches) -> dict[str, dict[int, dict]]:
    """Each worker's first call and warm-up at each batch, one worker after the other (a compile is timed with
    nothing else running): its ``warm`` replies by batch."""
    return {name: {b: w.ask(f"warm {b}") for b in batches} for name, w in workers.items()}


def time_rounds(
    workers: dict[str, Worker], batches, rounds: int, seconds: float, gap: float
) -> dict[str, dict[int, list[float]]]:
    """``rounds`` rounds: in each, at each batch, every worker in turn (the order rotated round by round) runs
    calls for ``seconds``, the others idle; ``gap`` seconds between two workers let the last one's threads
    stop spinning. Each worker's round medians (ms), by batch."""
    names = list(workers)
    out: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in names}
    for r in range(rounds):
        for b in batches:
            for name in names[r % len(names) :] + names[: r % len(names)]:
                time.sleep(gap)
                out[name][b].append(workers[name].ask(f"time {b} {seconds}")["ms"])
    return out


if __name__ == "__main__":
    main()
