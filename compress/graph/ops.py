"""The table of operators a stored graph may call, each with the cost compress charges for it.

An entry binds a name to a functional ATen overload (argument types from torch's own schema) and to
compress's own formula for what one call of it spends, from the shapes of its arguments and result on
the meta device:

* ``alloc``: bytes it allocates -- its results, plus any scratch its CPU kernel takes (the indices
  ``max_pool2d`` keeps, attention's score matrix, a convolution's unfolded input); an op that *may*
  copy (``view``, which runs as ``reshape``) is charged as a copy;
* ``work``: operations -- per output element, the window or reduction it reads (a convolution's
  ``C_in / groups x k x k`` multiply-adds, a pooling window, a mean's reduced elements);
* ``results``: how many tensors it returns, known from its arguments *before* it runs (``split``), so a
  node cannot ask the check itself for millions of them.

An operator without a formula is not in the table. The table is what ``torch.export`` makes of the
architectures compress is tested on (the zoo and the real-architecture matrix: ResNets, SE-ResNet,
DenseNet, MobileNetV2/V3, ShuffleNetV2, ResNeXt, RegNet, ConvNeXt, a ViT block) and a few activations of
the same kind; ``tests/graph/test_ops.py`` checks every formula against the bytes torch really allocates
for that op, at two sizes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAX_RESULTS = 1024  # tensors one node may return
NODE_BYTES = 256  # charged to every call besides its formula: the small tensors a kernel makes (a wrapped scalar)


@dataclass(frozen=True)
class Op:
    """One entry of the operator table: what it calls, the types of its arguments and what it costs."""

    name: str
    fn: Any
    args: tuple  # ((name, type, kwarg_only, required), ...) from torch's schema
    returns: str  # "tensor", "int" or "tuple"
    view: bool  # the result always shares memory with its first tensor argument (never copies)
    cost: Callable  # (args, kwargs, out) -> (bytes allocated, operations); ``charge`` adds NODE_BYTES
    results: Callable | None = None  # (args, kwargs) -> how many tensors a "tuple" op returns

    def charge(self, args, kwargs, out) -> tuple[int, int]:
        """(bytes allocated, operations) of one call, from its arguments and result (meta tensors will do)."""
        alloc, work = self.cost(args, kwargs, out)
        return (alloc + NODE_BYTES if alloc else 0), work


def nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(nbytes(x) for x in v)
    return 0


def numel(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel()
    if isinstance(v, (list, tuple)):
        return sum(numel(x) for x in v)
    return 0


# ----------------------------------------------------------------------------- formulas
def _pointwise(per_element: int) -> Callable:
    """A new tensor the size of the result, ``per_element`` operations for each of its elements."""
    return lambda a, k, out: (nbytes(out), per_element * numel(out))


def _view(a, k, out):
    return 0, 1


def _copy(a, k, out):  # a view that may copy (reshape of a non-contiguous tensor): charged as a copy
    return nbytes(out), 4 * numel(out)


def _blocked(t: torch.Tensor) -> int:
    """Elements of ``t`` with its channels (dim 1) padded to a multiple of 16: the blocked layout oneDNN's CPU
    convolution reorders its input and output into (a 1-channel image takes 16x its size there)."""
    if t.dim() < 2:
        return t.numel()
    return t.numel() // max(t.shape[1], 1) * (-(-t.shape[1] // 16) * 16)


def _slow(t: torch.Tensor) -> int:
    """How much slower than float32 a matrix kernel runs on ``t``'s dtype here (bfloat16, float16, float64)."""
    return 1 if t.dtype == torch.float32 else 8


def _conv(a, k, out):
    x, w = a[0], a[1]
    taps = w[0].numel()  # C_in / groups x kernel
    spatial = math.prod(out.shape[2:]) if out.dim() > 2 else 1
    unfolded = taps * spatial * x.element_size()  # one sample's columns, where the kernel unfolds its input
    # the blocked copies of input and output: both live at once with AVX-512 (a 1-channel 1x1 convolution of a
    # 256 x 256 image peaked at 2 x 16 x its input there); AVX2 machines showed the larger of the two
    reorder = (_blocked(x) + _blocked(out)) * x.element_size()
    # few channels a group (depthwise, a 1-channel image) leave the vector units idle: up to 16x the time
    idle = 16 // min(16, max(w.shape[1], 1))
    work = 2 * out.numel() * taps * idle * _slow(x) + 4 * (_blocked(x) + _blocked(out)) + out.numel()
    return nbytes(out) + reorder + unfolded, work


def _linear(a, k, out):
    return nbytes(out), 2 * out.numel() * a[1].shape[-1] * _slow(a[0]) + out.numel()


def _window(a, k, out):
    kernel = a[1]
    return math.prod(kernel) if isinstance(kernel, (list, tuple)) and kernel else 1


# a pooling window's element costs CPU kernels ~100x a convolution's multiply-add (0.1-0.3e9 a second on two
# cores, against tens of GFLOP/s): charged at 64 operations, so a window bomb is refused at a time-like cost
WINDOW = 64


def _max_pool(a, k, out):  # the CPU kernel computes the argmax indices (int64) beside the values
    return nbytes(out) + 8 * out.numel(), out.numel() * (WINDOW * _window(a, k, out) + 1)


def _avg_pool(a, k, out):
    return nbytes(out), out.numel() * (WINDOW * _window(a, k, out) + 1)


def _adaptive_pool(a, k, out):
    x = a[0]
    window = 1
    for i, o in zip(
        x.shape[-2:], out.shape[-2:], strict=False
    ):  # a window of at most ceil(in / out) + 1 elements a side
        window *= -(-i // max(o, 1)) + 1
    return nbytes(out), out.numel() * (WINDOW * window + 1)


def _reduce(a, k, out):  # a dtype other than the input's converts a copy of it first
    x = a[0]
    copy = x.numel() * out.element_size() if out.dtype != x.dtype else 0
    return nbytes(out) + copy, 8 * x.numel() * _slow(out) + out.numel()


def _norm(per_element: int) -> Callable:
    def f(a, k, out):  # the result, a mean and a deviation per normalised row, a contiguous copy of a strided input
        x = a[0]
        rows = x.numel() // max(math.prod(x.shape[-len(a[1]) :]) if isinstance(a[1], list) and a[1] else 1, 1)
        copy = 0 if x.is_contiguous() else nbytes(x)
        return nbytes(out) + 8 * rows + copy, per_element * numel(out)

    return f


def _batch_norm(a, k, out):  # the result, and a saved mean and deviation per channel
    channels = a[0].shape[1] if a[0].dim() > 1 else 1
    return nbytes(out) + 8 * channels, 16 * numel(out)


def _attention(a, k, out):
    q, key, v = a[0], a[1], a[2]
    heads = q.numel() // max(q.shape[-1] * q.shape[-2], 1)
    scores = heads * q.shape[-2] * key.shape[-2]  # one score per query and key, for every batch x head
    # charged as the math kernel, which holds the scores, their softmax and a copy of the three inputs at once
    # (the fused CPU kernel works in blocks and takes less)
    alloc = nbytes(out) + 3 * scores * q.element_size() + nbytes([q, key, v])
    return alloc, 2 * scores * (q.shape[-1] + v.shape[-1]) + 8 * scores


def _split_results(a, k):
    x, size = a[0], a[1]
    dim = a[2] if len(a) > 2 else k.get("dim", 0)
    if not isinstance(size, int) or size <= 0 or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        return MAX_RESULTS + 1  # torch refuses it anyway; never run the meta kernel on it
    return max(-(-x.shape[dim] // size), 1)


def _no_cost(a, k, out):
    return 0, 0


# operations charged per output element: what a CPU kernel's time per element is worth in multiply-adds of a
# float32 convolution (a broadcast add runs ~3.4 ns an element on two cores, a convolution ~0.4 ns a FLOP)
_POINTWISE = {
    8: "relu relu6 hardtanh hardswish hardsigmoid leaky_relu clamp clamp_min clamp_max neg abs clone "
    "add.Tensor add.Scalar sub.Tensor sub.Scalar mul.Tensor mul.Scalar div.Tensor div.Scalar",
    32: "sigmoid silu gelu tanh",
}
FORMULAS: dict[str, Callable] = {
    **{n: _pointwise(c) for c, names in _POINTWISE.items() for n in names.split()},
    "conv2d": _conv,
    "linear": _linear,
    "_native_batch_norm_legit_no_training": _batch_norm,
    "layer_norm": _norm(32),
    "max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": _adaptive_pool,
    "mean.dim": _reduce,
    "cat": _pointwise(4),
    "view": _copy,
    "permute": _view,
    "transpose.int": _view,
    "select.int": _view,
    "squeeze.dim": _view,
    "unsqueeze": _view,
    "split.Tensor": _view,
    "sym_size.int": _no_cost,
    "scaled_dot_product_attention": _attention,
}
RESULTS: dict[str, Callable] = {"split.Tensor": _split_results, "_native_batch_norm_legit_no_training": lambda a, k: 3}
# literals that would make an eval model random: each must be 0 (a float literal; a reference is refused)
NO_RANDOM = {"scaled_dot_product_attention": "dropout_p"}
# ops whose result has their first argument's shape, dtype and size: the cost check (shapes only) takes the
# argument for the result instead of calling a meta kernel (~0.2 ms each, in Python, for pointwise ops)
SAME_SHAPE = frozenset(
    """relu relu6 hardtanh hardswish hardsigmoid sigmoid silu gelu tanh leaky_relu clamp clamp_min
clamp_max neg abs clone""".split()
)

_BASE = frozenset("Tensor int float bool number str ScalarType MemoryFormat Layout Device".split())


def _type_ok(t: str) -> bool:
    while t.startswith(("Optional[", "List[")):
        t = t[t.index("[") + 1 : -1]
    return t in _BASE


def _aten(name: str, cost: Callable) -> Op | None:
    packet, _, overload = name.partition(".")
    fn = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
    if fn is None:
        return None
    s = fn._schema
    if s.is_mutable or not s.returns or any(a.name == "device" for a in s.arguments):
        return None
    args = tuple((a.name, str(a.real_type), a.kwarg_only, not a.has_default_value()) for a in s.arguments)
    rets = [str(r.real_type) for r in s.returns]
    if not all(_type_ok(t) for _, t, _, _ in args):
        return None
    if rets == ["Tensor"]:
        returns = "tensor"
    elif rets == ["int"]:
        returns = "int"
    elif all(r == "Tensor" for r in rets) or rets == ["List[Tensor]"]:
        returns = "tuple"
    else:
        return None
    view = s.returns[0].alias_info is not None and name != "view"
    return Op(name, fn, args, returns, view, cost, RESULTS.get(name))


OPS: dict[str, Op] = {}
for _name, _cost in FORMULAS.items():
    _op = _aten(_name, _cost)
    if _op is not None:  # an op this torch does not have, or that turned mutable, is left out
        OPS[_name] = _op
OPS["getitem"] = Op(
    "getitem", operator.getitem, (("self", "tuple", False, True), ("index", "int", False, True)), "tensor", True, _view
)
OPS["sym_mul"] = Op(
    "sym_mul", operator.mul, (("self", "symint", False, True), ("factor", "int", False, True)), "int", False, _no_cost
)
OP_NAMES = {op.fn: name for name, op in OPS.items() if name not in ("getitem", "sym_mul")}
# a view runs as reshape: same values, and it also holds where an op's strides on another device or
# kernel (the meta device that the cost check runs on, a fused attention kernel) differ from the capture's;
# it may copy, so it is charged as a copy
OPS["view"] = Op("view", torch.ops.aten.reshape.default, OPS["view"].args, "tensor", False, _copy)
