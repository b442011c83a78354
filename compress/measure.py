"""What a compressed model is measured by: params, nonzeros, MACs, latency, accuracy, per layer."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress import kinds
from compress.counting import _run_checked, check_call, counts, known_cost
from compress.data import as_data, batches, check_fits, eval_batch_size
from compress.distributed import device_of
from compress.errors import CompressError
from compress.graph.model import GraphModel
from compress.quant_state import get_state
from compress.scoring import evaluate, resolve_metric

log = logging.getLogger(__name__)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


@functools.singledispatch
def layer_table(model: nn.Module, input_shape) -> list[dict[str, Any]]:
    """Per leaf layer with weights: name, type, params, nonzeros, MACs, output shape. A model decoded from its
    stored graph has no layers: per group of its nodes (``GraphModel.layer_table``)."""
    rows: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def fn(m, inp, out):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else []
            macs = 0
            if isinstance(m, nn.Conv2d) and isinstance(out, torch.Tensor):
                macs = out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear) and isinstance(out, torch.Tensor):
                macs = out[0].numel() * m.in_features
            rows[name].update(output_shape=shape[1:], macs=int(macs))

        return fn

    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        rows[name] = {
            "name": name,
            "type": type(m).__name__,
            "params": sum(p.numel() for p in own),
            "nonzeros": sum(int(torch.count_nonzero(p)) for p in own),
            "macs": 0,
            "output_shape": [],
        }
        q = get_state(m)
        if q is not None:
            rows[name]["bits"] = q.bits
        hooks.append(m.register_forward_hook(hook(name)))
    try:
        _run_checked(model.eval(), torch.zeros(input_shape, device=device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    return list(rows.values())


@layer_table.register(GraphModel)
def _graph_layer_table(model: GraphModel, input_shape) -> list[dict[str, Any]]:
    return model.layer_table()


def _timed(model, x, dtype=None):
    """One timed forward pass (ms): CUDA events on a GPU (its work is asynchronous), the wall clock
    elsewhere; under autocast to ``dtype`` (bfloat16, float16) when given."""
    import contextlib

    def cast():
        return torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def once() -> float:
            with cast():
                start.record()
                model(x)
                end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return once

    def once() -> float:
        t0 = time.perf_counter()
        with cast():
            model(x)
        return (time.perf_counter() - t0) * 1000

    return once


def _warm_up(run, window: int = 5, max_seconds: float | None = None) -> float:
    """Run until the median of a window of runs is within 10% of the window before it, or for ``max_seconds``
    (default: twice ``timing_seconds()``, 3 s unless COMPRESS_LATENCY_SECONDS says otherwise).

    A fresh process can run a small model orders of magnitude slower for its first seconds (thread
    pools and allocators warming up); timing that phase would report any change as a huge speed-up.
    """
    prev, deadline = None, time.perf_counter() + (2 * timing_seconds() if max_seconds is None else max_seconds)
    while True:
        times = []
        for _ in range(window):  # a model whose one run takes seconds stops at the deadline, not after a window
            times.append(run())
            if time.perf_counter() > deadline:
                return statistics.median(times)
        med = statistics.median(times)
        if prev is not None and abs(med - prev) <= 0.1 * prev:
            return med  # ms of one run, once stable
        prev = med


def timing_seconds() -> float:
    """Seconds of timed runs per measurement (COMPRESS_LATENCY_SECONDS, default 1.5)."""
    import os

    try:
        return max(0.05, float(os.environ.get("COMPRESS_LATENCY_SECONDS", 1.5)))
    except ValueError:
        return 1.5


def timing_threads() -> int:
    """Threads latency is timed on (COMPRESS_THREADS, set by ``--threads``; default 2: on a shared machine
    the figure that repeats)."""
    import os

    try:
        return max(1, int(os.environ.get("COMPRESS_THREADS", 2)))
    except ValueError:
        return 2


def latency_stats(
    models: list,
    input_shape,
    batch: int = 1,
    runs: int = 20,
    threads: int | None = None,
    dtype=None,
    raw: list | None = None,
) -> list[dict]:
    """Per model (a module, or any callable of a CPU tensor: an ONNX Runtime or OpenVINO session's runner) (ms of
    one forward pass at ``batch``): ``ms``, the median of all timed runs, with ``p25`` and ``p75``, the
    quartiles of the same runs (so the figure always lies within its range), ``runs`` their number and
    ``spread`` (p75 - p25) / median and ``busy`` (why they look like a busy machine's, or None: ``busy_reason``).

    Each model is warmed up until stable; then the runs are interleaved (model 1, model 2, model 1,
    ...), so that a machine that speeds up or slows down meanwhile affects every model alike: at
    least ``runs`` rounds, and as many more as fill ``timing_seconds()``. ``dtype``: time under
    autocast (torch.bfloat16 / torch.float16), as a GPU deployment would run. ``raw``: a list that
    receives each model's times, round by round (for paired comparisons: ``speed_ratio``).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads or timing_threads())
    modes = [(m, m.training) for m in models if isinstance(m, nn.Module)]
    for m, _ in modes:  # timed as deployed: BatchNorm on its running statistics, no dropout
        m.eval()
    for m in models:  # the shape may be a file's: its cost at this batch is checked before any input is made
        check_call(m, input_shape, batch)
    try:
        with torch.no_grad():
            fns = [
                _timed(
                    m,
                    torch.randn(
                        (batch,) + tuple(input_shape[1:]),  # a runtime's callable: on the CPU
                        device=device_of(m) if isinstance(m, nn.Module) else "cpu",
                    ),
                    dtype,
                )
                for m in models
            ]
            per_run = sum(_warm_up(fn) for fn in fns)  # ms for one round over all models
            # as many rounds as fill timing_seconds(), at least ``runs``, but never more than four times that long
            # (at least 3 rounds): a model whose one run takes seconds is timed in seconds, not minutes
            cap = max(3, int(4000 * timing_seconds() / max(per_run, 1e-3)))
            rounds = min(max(runs, int(1000 * timing_seconds() / max(per_run, 1e-3))), 10_000, cap)
            times: list[list[float]] = [[] for _ in fns]
            deadline = time.perf_counter() + 4 * timing_seconds()  # a machine that turns busy meanwhile: the same cap
            for k in range(rounds):
                for t, fn in zip(times, fns, strict=False):
                    t.append(fn())
                if k >= 2 and time.perf_counter() > deadline:
                    break
        if raw is not None:
            raw.extend(times)
        return [run_stats(t, _macs(m, input_shape, batch)) for m, t in zip(models, times, strict=False)]
    finally:
        torch.set_num_threads(old)
        for m, was in modes:
            m.train(was)


def _macs(model, input_shape, batch: int) -> int | None:
    """Multiply-accumulates of one call at ``batch`` (the sample cost ``check_call`` counted on the meta device
    before the timing); None for a runtime's callable or a model that counts its own calls."""
    try:
        cost = known_cost(model, input_shape)
    except CompressError:
        return None
    return None if cost is None else batch * cost[1] // 2


def run_stats(times: list[float], macs: int | None = None) -> dict[str, Any]:
    """``ms`` (the median), ``p25``, ``p75`` (the quartiles), ``runs`` and ``spread`` ((p75 - p25) / median) of one
    model's timed runs: every figure from the same runs, so the median lies within its interquartile range.
    ``busy``: why the runs look like a busy machine's (``busy_reason``), or None; ``macs``: the work of one
    run, when known."""
    t = sorted(times)
    med = statistics.median(t)
    q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3

    def sig(v: float) -> float:  # 6 significant digits: a ratio of two figures stays within 1e-5 of the runs'
        return float(f"{v:.6g}")

    st: dict[str, Any] = {
        "ms": sig(med),
        "median": sig(med),
        "p25": sig(min(q[0], med)),
        "p75": sig(max(q[2], med)),
        "runs": len(t),
        "spread": round((q[2] - q[0]) / med, 4) if med > 0 else 0.0,
    }
    st["busy"] = busy_reason(st["ms"], st["spread"], macs)
    return st


BUSY_SPREAD = 0.5  # runs whose interquartile range is more than half their median: the machine was busy
SLOW_MS, SLOW_RATE = 20.0, 1e8  # a run over 20 ms at under 100M MAC/s (any CPU does more): a busy machine
BUSY = "the machine looks busy"


def busy_reason(ms: float, spread: float | None, macs: int | None = None) -> str | None:
    """Why runs of median ``ms`` and ``spread`` ((p75 - p25) / median) look like a busy machine's, or None: runs
    spread over more than half their median, or a model of ``macs`` multiply-accumulates run at a rate no idle
    CPU is that slow at (seen on a shared 2-core machine: a 2.3M-MAC LeNet-5 took a steady 190 ms on 2 threads,
    its threads waiting for each other, and 0.6 ms on 1)."""
    if spread is not None and spread > BUSY_SPREAD:
        return f"runs spread {spread:.0%} of their median"
    if macs and ms > SLOW_MS and macs / (ms / 1000) < SLOW_RATE:
        return f"{macs / 1e6:.3g}M MACs took {ms:.0f} ms, {macs / ms / 1e3:.3g}M MAC/s"
    return None


def latency_ms(model, input_shape, batch: int = 1, runs: int = 20, threads: int | None = None) -> float:
    """Median wall time (ms) of one forward pass at ``batch``, after a warm-up until stable."""
    return latency_stats([model], input_shape, batch, runs, threads)[0]["ms"]


def latencies(models: list, input_shape, runs: int = 20) -> list[dict]:
    """``{"batch_1": ms, "batch_32": ms, "iqr": {...}, "spread": {...}, "runs": {...}, "busy": {...}}`` per model,
    measured interleaved: the median of each model's runs and the quartiles, spread and busy-machine reason of the
    same runs (``run_stats``);
    with two models the second also gets ``"speedup": {batch: [low, ratio, high]}``, the ratio of the two
    medians with its 95% interval (``speed_ratio``)."""
    outs: list[dict[str, Any]] = [{"iqr": {}, "spread": {}, "runs": {}, "busy": {}} for _ in models]
    for key, batch, n in (("batch_1", 1, runs), ("batch_32", 32, max(5, runs // 2))):
        raw: list = []
        for o, st in zip(outs, latency_stats(models, input_shape, batch, n, raw=raw), strict=False):
            o[key] = st["ms"]
            o["iqr"][key] = [st["p25"], st["p75"]]
            o["spread"][key] = st["spread"]
            o["runs"][key] = st["runs"]
            o["busy"][key] = st["busy"]
        if len(models) == 2:
            outs[1].setdefault("speedup", {})[key] = speed_ratio(raw[0], raw[1])
    return outs


def runtime_accuracy(predict, data) -> float:
    """Top-1 accuracy (%) on ``data`` of another runtime's ``predict(inputs) -> logits`` (numpy arrays in and
    out: an ONNX Runtime session, a compiled OpenVINO model), read in batches."""
    right = total = 0
    for x, y in batches(data, eval_batch_size(data)):
        right += int((predict(x.numpy()).argmax(1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * right / max(total, 1)


def median_latency_ms(run, input_shape, batch: int, runs: int = 20) -> float:
    """Median ms of one call of ``run`` (another runtime's callable of a CPU tensor: an ONNX Runtime session, a
    compiled OpenVINO model) at ``batch``, timed alone after a warm-up until stable."""
    x = torch.randn((batch,) + tuple(input_shape[1:]))

    def once() -> float:
        t0 = time.perf_counter()
        run(x)
        return (time.perf_counter() - t0) * 1000

    _warm_up(once)
    return float(statistics.median(once() for _ in range(runs)))


def paired_speed(before, after, input_shape, batch: int = 32, runs: int = 10) -> dict[str, Any]:
    """Two models (or runtimes' callables) timed interleaved at ``batch``: their median ms, the speed-up of ``after``
    (the ratio of those medians) with its 95% interval, and the verdict that interval allows (``speed_change``)."""
    raw: list = []
    a, b = latency_stats([before, after], input_shape, batch, runs, raw=raw)
    interval = speed_ratio(raw[0], raw[1])
    return {
        "before_ms": a["ms"],
        "after_ms": b["ms"],
        "speedup": interval,
        "verdict": speed_change(a["ms"], b["ms"], interval, a["busy"] or b["busy"]),
    }


BOOTSTRAP = 1000  # resamples of the rounds for a speed ratio's interval (fewer for many rounds: at most 4M values)


def speed_ratio(before: list[float], after: list[float]) -> list[float]:
    """[low, ratio, high]: the ratio median(before) / median(after) of interleaved runs -- exactly the ratio of
    the two figures a table shows -- and its 95% interval, from a paired bootstrap over the rounds (seeded: the
    same runs give the same interval). Resampling whole rounds keeps the pairing in time, so a machine that
    slows down for a while slows both, and the interval stays honest."""
    if len(before) != len(after):
        raise ValueError(f"speed_ratio needs runs in pairs, got {len(before)} and {len(after)}")
    if not before:
        return [1.0, 1.0, 1.0]
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    r = float(np.median(b) / np.median(a)) if np.median(a) > 0 else 1.0
    n = len(b)
    if n < 2:
        return [round(r, 4)] * 3
    k = max(200, min(BOOTSTRAP, 4_000_000 // n))
    idx = np.random.default_rng(0).integers(0, n, size=(k, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.median(b[idx], axis=1) / np.median(a[idx], axis=1)
    boot = boot[np.isfinite(boot)]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) else (r, r)
    return [round(min(float(lo), r), 4), round(r, 4), round(max(float(hi), r), 4)]


SAME = 1.05  # a change of speed smaller than 5% is not called one, whatever its interval
TOO_NOISY = 1.5  # an interval of the speed ratio wider than this (hi / lo) tells nothing


def speed_change(
    before_ms: float | None, after_ms: float | None, interval: list | None = None, busy: str | None = None
) -> str:
    """The verdict on two figures: the ratio it prints is before_ms / after_ms, the figures beside it, so
    "faster" never stands beside a larger "after". "1.9x faster (1.8-2.0)" only when the 95% interval of that
    ratio (``speed_ratio``) lies above 1.05; "1.9x slower" when below 1/1.05; else "same" -- "same within noise
    (0.9-1.1)" when the interval is wider than +-5%, and "too noisy to tell (0.6-1.7)" with a hint when it is
    wider than 1.5x. An interval that does not hold the figures' ratio was measured on other runs: no verdict.
    ``busy``: why the runs compared look like a busy machine's (``busy_reason``): the verdict then says so,
    and that the comparison is not reliable. Without an interval (one-off timings), only a
    change beyond 1.5x is called."""
    if not before_ms or not after_ms:
        return "-"
    r = before_ms / after_ms
    why = f" ({busy})" if busy else ""
    unreliable = f"; {BUSY}{why}: not reliable" if busy else ""
    if interval is None:
        lo = hi = r
        if 1 / 1.5 <= r <= 1.5:
            return "same" + unreliable
    else:
        lo, _, hi = interval
        if not lo * 0.995 <= r <= hi * 1.005:  # (0.5%: the figures are rounded)
            return (
                f"not comparable: {before_ms:g} / {after_ms:g} = {r:.2f} lies outside the interval of the ratio "
                f"({lo:.2f}-{hi:.2f}) it was given; {BUSY}, time again"
            )
    span = f" ({lo:.2f}-{hi:.2f})" if interval else ""
    if lo > SAME:
        return f"{r:.2f}x faster{span}" + unreliable
    if hi < 1 / SAME:
        return f"{1 / r:.2f}x slower" + (f" ({1 / hi:.2f}-{1 / lo:.2f})" if interval else "") + unreliable
    if 1 / SAME <= lo and hi <= SAME:
        return "same" + unreliable
    if hi / lo > TOO_NOISY or busy:  # the interval says nothing either way: the machine was busy
        return (
            f"too noisy to tell ({lo:.2f}-{hi:.2f}): {BUSY}{why}, the comparison is not reliable; time again on "
            "an idle machine, or with --threads"
        )
    return f"same within noise ({lo:.2f}-{hi:.2f})"


def summarize(
    model: nn.Module, input_shape, data=None, latency: bool = True, layers: bool = True, runs: int = 20, metric=None
) -> dict[str, Any]:
    """The numbers that matter for one model, as a JSON-able dict; ``accuracy`` is ``metric``'s score on
    ``data`` (default top-1 accuracy in percent; anything ``compress.data.as_data`` takes), ``metric`` its label."""
    c = counts(model, input_shape)  # an INT8 model's: its architecture's counts, as integers
    out: dict[str, Any] = {"params": c["params"], "dense_fp32_bytes": c["params"] * 4, "nonzero_params": c["nonzeros"]}
    executes = kinds.execution(model)  # how a model that does not run as float layers runs (INT8 kernels)
    if executes is not None:
        out["int8"] = executes
    if input_shape is not None:  # weight-only numbers otherwise
        out.update(macs=c["macs"], input_shape=list(input_shape))
    if data is not None:
        data = as_data(data, arg="data")
        m = resolve_metric(metric)
        check_fits(model, data, labels_needed=m.builtin)
        out["accuracy"] = round(evaluate(model, data, m), 3)
        out["metric"] = m.label
    if latency and input_shape is not None:
        out["latency_ms"] = latencies([model], input_shape, runs)[0]
    if layers and input_shape is not None and executes is None and not isinstance(model, torch.jit.ScriptModule):
        out["layers"] = layer_table(model, input_shape)
    return out
