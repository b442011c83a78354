"""What a compressed model is measured by: params, nonzeros, MACs, latency, accuracy, per layer."""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from .errors import InputError
from .quant_state import get_state

log = logging.getLogger(__name__)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def _run_checked(model, x):
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:140] if str(e).strip() else type(e).__name__
        raise InputError(f"input of shape {tuple(x.shape)} does not fit the model: {msg}") from e


def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one sample (torch.utils.flop_counter FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(input_shape)
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        _run_checked(model, x)
    return int(counter.get_total_flops() // 2 // input_shape[0])


def layer_table(model: nn.Module, input_shape) -> list[dict[str, Any]]:
    """Per leaf layer with weights: name, type, params, nonzeros, MACs, output shape."""
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
        rows[name] = {"name": name, "type": type(m).__name__, "params": sum(p.numel() for p in own),
                      "nonzeros": sum(int(torch.count_nonzero(p)) for p in own), "macs": 0, "output_shape": []}
        q = get_state(m)
        if q is not None:
            rows[name]["bits"] = q.bits
        hooks.append(m.register_forward_hook(hook(name)))
    try:
        _run_checked(model.eval(), torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    return list(rows.values())


def latency_ms(model, input_shape, batch: int = 1, runs: int = 20, warmup: int = 3, threads: int | None = 2) -> float:
    """Median wall time of one forward pass at ``batch``, after warm-up, with fixed threads."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.randn((batch,) + tuple(input_shape[1:]))
        times = []
        with torch.no_grad():
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000)
        return float(statistics.median(times))
    finally:
        torch.set_num_threads(old)


def summarize(model: nn.Module, input_shape, data=None, latency: bool = True,
              layers: bool = True, runs: int = 20) -> dict[str, Any]:
    """The numbers that matter for one model, as a JSON-able dict."""
    from .train import evaluate

    params = count_params(model)
    out: dict[str, Any] = {"params": params, "nonzero_params": count_nonzero(model), "dense_fp32_bytes": params * 4}
    if input_shape is not None:  # weight-only numbers otherwise
        out.update(macs=count_macs(model, input_shape), input_shape=list(input_shape))
    if data is not None:
        from .data import check_fits

        check_fits(model, data)
        out["accuracy"] = round(evaluate(model, data), 3)
    if latency and input_shape is not None:
        out["latency_ms"] = {"batch_1": round(latency_ms(model, input_shape, 1, runs=runs), 4),
                             "batch_32": round(latency_ms(model, input_shape, 32, runs=max(5, runs // 2)), 4)}
    if layers and input_shape is not None and not isinstance(model, torch.jit.ScriptModule):
        out["layers"] = layer_table(model, input_shape)
    return out
