"""Counting a model: parameters, nonzeros, multiply-accumulates (a leaf: what every model knows of itself)."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import weakref
from typing import Any

import torch
import torch.nn as nn

from compress import budget
from compress.distributed import device_of
from compress.errors import InputError, first_line


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@functools.singledispatch
def counts(model: nn.Module, input_shape=None) -> dict[str, Any]:
    """``params``, ``nonzeros`` and (for an ``input_shape``) ``macs`` of a model. A kind of model that runs its
    own kernels registers its own (an INT8 model: its float architecture's counts, as integers)."""
    out: dict[str, Any] = {"params": count_params(model), "nonzeros": count_nonzero(model)}
    if input_shape is not None:
        out["macs"] = count_macs(model, input_shape)
    return out


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


# torch wraps every dispatch mode's ``__torch_dispatch__`` in ``torch._compile._disable_dynamo``, whose first call
# imports torch._dynamo to make the disabled function (and caches it on the wrapped function under this name): a
# second of start-up for a command that only counts (``compress report``), and nothing is being compiled then
_DYNAMO_CACHE = "__dynamo_disable"


@contextlib.contextmanager
def no_dynamo_import(mode: type):
    """While torch._dynamo is not imported, calls of the dispatch mode class ``mode`` run its own
    ``__torch_dispatch__`` instead of importing torch._dynamo to disable itself in a compilation that no part of
    this process can be running (a process compiles only once it has imported it). The same numbers, as
    ``tests/test_measure.py`` checks; where torch._dynamo is imported, or torch wraps modes otherwise, nothing
    changes."""
    raw = getattr(mode.__dict__.get("__torch_dispatch__"), "__wrapped__", None)
    if raw is None or "torch._dynamo" in sys.modules or hasattr(raw, _DYNAMO_CACHE):
        yield
        return
    setattr(raw, _DYNAMO_CACHE, raw)
    try:
        yield
    finally:
        if getattr(raw, _DYNAMO_CACHE, None) is raw:
            delattr(raw, _DYNAMO_CACHE)  # a later call in a compiling process disables dynamo as torch does


@functools.cache
def _flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(FlopCounterMode):
        """torch's FLOP counter, whose dispatch mode does not import torch._dynamo (``no_dynamo_import``)."""

        def __enter__(self):
            out = super().__enter__()
            self._quiet = no_dynamo_import(type(self.mode))
            self._quiet.__enter__()
            return out

        def __exit__(self, *exc):
            try:
                return super().__exit__(*exc)
            finally:
                self._quiet.__exit__(None, None, None)

    return Counter


def mac_counter():
    """torch's FLOP counter (a context manager; ``get_total_flops()``: twice the MACs), CPU attention included."""
    return _flop_counter_mode()(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    )


def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of one sample (torch.utils.flop_counter FLOPs / 2). MultiheadAttention's
    fused fast path (taken under no_grad) is switched off while counting: its one kernel is invisible
    to the counter, which undercounted a ViT-B/16 by a third."""
    x = torch.zeros(input_shape, device=device_of(model))
    model.eval()
    counter = mac_counter()
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
    nothing allocated): the input and four times the largest output of any leaf module (a layer's input,
    its output, a residual and a kernel's scratch live at once) and torch's FLOP count. What a shape read
    from a file asks of a model before it runs at that shape; InputError if the model does not run on the
    meta device."""
    import copy

    largest = [0]

    def hook(m, inp, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                largest[0] = max(largest[0], t.numel() * t.element_size())

    try:
        meta = copy.deepcopy(model).to("meta").eval()
        hooks = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
        x = torch.zeros((1, *tuple(input_shape)[1:]), device="meta")
        with torch.no_grad(), _flop_counter_mode()(display=False) as fc:
            meta(x)
    except Exception as e:
        raise InputError(
            f"the model does not run on the meta device at input shape {tuple(input_shape)}, so "
            f"the cost of that shape cannot be counted before it runs ({first_line(e, 100)})"
        ) from None
    for h in hooks:
        h.remove()
    return x.numel() * 4 + 4 * largest[0], int(fc.get_total_flops())


def sample_ops(model: nn.Module, input_shape, limit: int) -> int:
    """The operations (aten calls) one sample through ``model`` dispatches, counted on the meta device and
    stopped once past ``limit`` (then ``limit + 1``): the nodes of the graph torch.export or FX traces of it,
    which each cost a rebuild of an INT8 model tens of milliseconds. InputError if the model does not run on
    the meta device."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            if self.n > limit:
                raise _Enough
            return func(*args, **(kwargs or {}))

    try:
        meta = copy.deepcopy(model).to("meta").eval()
        with torch.no_grad(), no_dynamo_import(Count), Count() as count:
            meta(torch.zeros((1, *tuple(input_shape)[1:]), device="meta"))
    except _Enough:
        pass
    except Exception as e:
        raise InputError(
            f"the model does not run on the meta device at input shape {tuple(input_shape)} ({first_line(e, 100)})"
        ) from None
    return count.n


class _Enough(Exception):
    pass


_COSTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
SMALL_INPUT = 1 << 20  # values per sample a model whose code does not run on the meta device may still be run at


@functools.singledispatch
def known_cost(model, input_shape) -> tuple[int, int] | None:
    """``sample_cost`` of one sample of ``input_shape`` (its batch aside), counted once per model and shape;
    (0, 0) for a small input the model's code cannot run on the meta device (InputError for a large one), None
    for models that check each call themselves (a stored graph, an INT8 model) and callables that are not
    modules. A model that checks each call itself registers None for its type (``known_cost.register``)."""
    if not isinstance(model, nn.Module):
        return None
    shape = tuple(input_shape)[1:]
    costs = _COSTS.setdefault(model, {})
    if shape not in costs:
        try:
            costs[shape] = sample_cost(model, (1, *shape))
        except InputError:
            if math.prod(shape) > SMALL_INPUT:
                raise
            costs[shape] = (0, 0)  # a small input: run as it is
    return costs[shape]


def check_call(model, input_shape, batch: int = 1) -> None:
    """Refuse (InputError) to run ``model`` on ``batch`` samples of ``input_shape`` -- a shape a file's metadata
    may have chosen -- when one sample's cost (``known_cost``) times the batch passes what its weights and that
    input justify (``budget.limits``, as a stored graph's). Models that check each call themselves (a stored
    graph, an INT8 model) and callables that are not modules pass."""
    cost = known_cost(model, input_shape)
    if cost is None:
        return
    nbytes, work = cost
    shape = tuple(input_shape)[1:]
    values = math.prod(shape)
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() for t in tensors)
    max_work, max_bytes = budget.limits(
        budget.justified(weights, sum(t.numel() * t.element_size() for t in tensors), values, 4 * values), batch
    )
    if batch * nbytes > max_bytes or batch * work > max_work:
        raise InputError(
            f"a batch of {batch} at input shape {(batch, *shape)} asks for about {batch * work:.3g} "
            f"operations and {batch * nbytes / 2**20:,.0f} MiB; its {weights:,} weights and that input "
            f"justify at most {max_work:.3g} and {max_bytes / 2**20:,.0f} MiB (COMPRESS_MAX_GRAPH_COST "
            "raises both for a model you trust)"
        )
