"""Counting a model: parameters, nonzeros, multiply-accumulates (a leaf: what every model knows of itself)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .distributed import device_of
from .errors import InputError, first_line


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def _run_checked(model, x):
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        msg = first_line(e)
        raise InputError(f"input of shape {tuple(x.shape)} does not fit the model: {msg}") from e


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kw) -> int:
    """FLOPs of CPU scaled-dot-product attention: Q K^T and (softmax) V, two batched matmuls."""
    *batch, length, dim = q
    s, dv = k[-2], v[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * length * s * dim + 2 * n * length * s * dv


def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one sample (torch.utils.flop_counter FLOPs / 2). MultiheadAttention's
    fused fast path (taken under no_grad) is switched off while counting: its one kernel is invisible
    to the counter, which undercounted a ViT-B/16 by a third."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(input_shape, device=device_of(model))
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops})
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter:
            _run_checked(model, x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops() // 2 // input_shape[0])


def sample_cost(model: nn.Module, input_shape) -> tuple[int, int]:
    """(bytes, operations) of one sample through ``model``, counted on the meta device (nothing computed,
    nothing allocated): every leaf module's output bytes added up (more than are ever live at once) and
    torch's FLOP count. What a shape read from a file asks of a model before it runs at that shape;
    InputError if the model does not run on the meta device."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    total = [0]

    def hook(m, inp, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    try:
        meta = copy.deepcopy(model).to("meta").eval()
        hooks = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
        x = torch.zeros((1, *tuple(input_shape)[1:]), device="meta")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            meta(x)
    except Exception as e:
        raise InputError(f"the model does not run on the meta device at input shape {tuple(input_shape)}, so "
                         f"the cost of that shape cannot be counted before it runs ({first_line(e, 100)})") from None
    for h in hooks:
        h.remove()
    return total[0] + x.numel() * 4, int(fc.get_total_flops())
