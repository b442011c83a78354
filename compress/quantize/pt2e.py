"""INT8 on the engine PyTorch keeps: torchao's PT2E flow, compiled by inductor.

``prepare`` exports a copy of the model (``torch.export``, a dynamic batch), annotates it with torchao's
``X86InductorQuantizer`` (per-channel symmetric int8 weights, per-tensor uint8 activations; conv-bn folded,
conv-add-relu fused by the compiler) with the activation observer asked for, and inserts observers (QAT: fake
quantization). ``calibrate`` (``int8.calibrate``) runs data through them; ``convert`` makes the reference graph
(quantize / dequantize around float ops, integer weights as constants) that ``Int8Model`` runs. On first use at
a shape it is compiled by ``torch.compile`` (inductor, weights frozen as constants): the pattern matcher turns
each dequantize-op-quantize into one oneDNN INT8 kernel. Compile seconds are kept apart from latency
(``Int8Model.compile_seconds``), and inductor's own on-disk cache makes a second load compile faster.

The file of such a model holds data only (``int8_file.py``): the float architecture, every constant of the
converted graph keyed by its name (integer weights, per-channel scales and zero points, float biases) and every
activation's scale and zero point keyed by its quantize node's name. Loading exports and converts the float
architecture again and puts those numbers back; no exported program, compiled artifact or code is ever read.

Observers: ``minmax``, ``histogram`` (torchao's least-L2 range), ``percentile`` (of each batch's values,
averaged) and ``mse`` (the clipping of the range with the least quantization error over a histogram of every value
seen). ``choose_observer`` tries each on part of the calibration data and keeps the one whose outputs are
closest to FP32 on the rest.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import logging
import math
import os
import platform
import shutil
import time
import types
import warnings
from typing import Any

import torch
import torch.nn as nn

from compress.errors import InputError
from compress.quantize.pt2e_patches import CALL, bn_folded_where_alone, one_partition_per_call, patterns

OBSERVERS = ("minmax", "histogram", "percentile", "mse")
PERCENTILE = 99.99
MAX_BATCH = 1024  # the exported graph's batch dimension: 1 .. MAX_BATCH
QDQ = ("quantize_per_tensor", "dequantize_per_tensor")  # the activation nodes whose scale and zero point are literal


def unavailable_library() -> str | None:
    """Why torchao's PT2E modules cannot be imported here, or None."""
    try:
        _ao()
    except ImportError as e:
        return f"torchao is not installed ({e})"
    return None


def unavailable() -> str | None:
    """Why PT2E cannot run here (no torchao, no C++ compiler for inductor's kernels), or None."""
    try:
        _ao()
    except ImportError as e:
        return f"torchao is not installed ({e})"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):  # ARM: XNNPACK's quantizer lowers for ExecuTorch, not here
        return (
            f"the x86 inductor quantizer needs an x86 CPU (this is {machine or 'unknown'}); FX runs QNNPACK's kernels"
        )
    if compiler() is None:
        return "no C++ compiler (g++, c++ or clang++; $CXX) for torch.compile"
    return None


def compiler() -> str | None:
    """The C++ compiler inductor would use, or None (looked up once for each $CXX and $PATH: every INT8 call asks,
    and a search of $PATH took ~40 us)."""
    return _compiler(os.environ.get("CXX"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=8)
def _compiler(cxx: str | None, path: str | None) -> str | None:
    for name in (cxx, "g++", "c++", "clang++"):
        if name and shutil.which(name, path=path):
            return name
    return None


def vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX): without them
    uint8 x int8 products can overflow 16 bits, and activations use 7 bits (torchao's ``reduce_range``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read(1 << 16)
    except OSError:
        return True  # not Linux: the kernels pick their own path; full range as the quantizer's default
    return any(k in flags for k in ("avx512_vnni", "avx_vnni", "amx_int8"))


@contextlib.contextmanager
def quiet():
    """torchao and torch.export log and warn at import and on every call (missing CUDA kernels, deprecated
    pytree registrations, observers used before calibration); nothing of the user's runs in here."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@functools.cache
def _ao() -> Any:
    """torchao's PT2E modules, imported once (quietly: it logs about kernels this machine does not have)."""
    with quiet():
        ns = type("ao", (), {})()
        ns.q = importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
        ns.xiq = importlib.import_module("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
        ns.obs = importlib.import_module("torchao.quantization.pt2e.observer")
        ns.pt2e = importlib.import_module("torchao.quantization.pt2e")
        ns.spec = importlib.import_module("torchao.quantization.pt2e.quantizer")
    return ns


@functools.cache
def observe_percentiles(obs: Any, x_orig: torch.Tensor, resize: bool = False) -> torch.Tensor:
    """A percentile observer's step (this module's and the FX one's, ``int8.py``): the ``100 - p`` and ``p``
    percentiles of the batch's values (of at most 2^20 evenly strided ones) folded into the running mean of the
    batches' percentiles in ``obs.min_val`` / ``obs.max_val`` (``resize``: torch.ao's buffers start empty)."""
    if x_orig.numel() == 0:
        return x_orig
    x = x_orig.detach().float().flatten()
    x = x[:: max(1, x.numel() >> 20)]
    q = torch.tensor([1 - obs.percentile / 100, obs.percentile / 100], device=x.device)
    lo, hi = torch.quantile(x, q)
    n = int(obs.batches)
    if n == 0:
        if resize:
            obs.min_val.resize_(lo.shape)
            obs.max_val.resize_(hi.shape)
        obs.min_val.copy_(lo)
        obs.max_val.copy_(hi)
    else:  # the running mean of the batches' percentiles
        obs.min_val.copy_(obs.min_val + (lo - obs.min_val) / (n + 1))
        obs.max_val.copy_(obs.max_val + (hi - obs.max_val) / (n + 1))
    obs.batches += 1
    return x_orig


def _observer_classes() -> dict[str, Any]:
    """The activation observer of each name, on torchao's observer base (made on first use: torchao loads
    lazily)."""
    obs = _ao().obs

    class Percentile(obs.MinMaxObserver):  # type: ignore[name-defined]
        """The range from the ``100 - p`` and ``p`` percentiles of each batch's values (of at most 2^20
        evenly strided ones), averaged over batches: outliers saturate instead of stretching the grid."""

        def __init__(self, percentile: float = PERCENTILE, **kw):
            super().__init__(**kw)
            self.percentile = percentile
            self.register_buffer("batches", torch.tensor(0))

        def forward(self, x_orig):
            return observe_percentiles(self, x_orig)

    class Mse(obs.HistogramObserver):  # type: ignore[name-defined]
        """The histogram of every value seen (torchao's, 2048 bins over the running range), then the range
        clipped to the fraction of it (0.3 .. 1; a range below zero shrinks with it) whose quantization error,
        summed over the histogram's bins, is least: an exhaustive search where torchao's own is greedy."""

        def calculate_qparams(self):
            lo, hi = float(self.min_val), float(self.max_val)
            counts = self.histogram.double()
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or float(counts.sum()) == 0:
                return super().calculate_qparams()
            width = (hi - lo) / counts.numel()
            centers = lo + width * (torch.arange(counts.numel(), dtype=torch.float64) + 0.5)
            best, best_err = (lo, hi), float("inf")
            for frac in torch.linspace(0.3, 1.0, 57).tolist():
                a, b = min(lo * frac, 0.0) if lo < 0 else lo, hi * frac if hi > 0 else hi
                scale, zp = self._calculate_qparams(torch.tensor(a), torch.tensor(b))
                q = torch.fake_quantize_per_tensor_affine(
                    centers.float(), float(scale), int(zp), int(self.quant_min), int(self.quant_max)
                ).double()
                err = float((counts * (q - centers) ** 2).sum())
                if err < best_err:
                    best, best_err = (a, b), err
            return self._calculate_qparams(torch.tensor(best[0]), torch.tensor(best[1]))

    return {
        "minmax": obs.MinMaxObserver,
        "histogram": obs.HistogramObserver,
        "percentile": Percentile,
        "mse": Mse,
    }


def quantizer(
    observer: str,
    keep_float: tuple[str, ...] = (),
    qat: bool = False,
    percentile: float = PERCENTILE,
    reduce_range: bool | None = None,
):
    """torchao's x86 inductor quantizer: its default config with the activation observer ``observer`` (QAT:
    its own moving-average fake quantization), 7-bit activations where the CPU lacks VNNI (``reduce_range``
    None: as this CPU needs), and the layers named in ``keep_float`` left in float."""
    ao = _ao()
    reduce = (not vnni()) if reduce_range is None else reduce_range
    base = ao.xiq.get_default_x86_inductor_quantization_config(is_qat=qat, reduce_range=reduce)
    config = base
    if not qat:
        if observer not in OBSERVERS:
            raise InputError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
        cls = _observer_classes()[observer]
        kw: dict[str, Any] = {"eps": 2**-12}
        if observer == "percentile":
            kw["percentile"] = percentile
        act = dataclasses.replace(base.input_activation, observer_or_fake_quant_ctr=cls.with_args(**kw))
        config = type(base)(act, act, base.weight, base.bias, base.is_qat)
    q = ao.xiq.X86InductorQuantizer().set_global(config)
    for name in keep_float:
        q.set_module_name_qconfig(name, None)
    return q


def export(model: nn.Module, input_shape) -> torch.fx.GraphModule:
    """``model`` (a copy, on the CPU) as the graph torch.export makes of it, its batch dimension dynamic."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, *tuple(input_shape)[1:])
    with quiet():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False).module()


def prepare(
    model: nn.Module,
    input_shape,
    observer: str = "histogram",
    keep_float: tuple[str, ...] = (),
    qat: bool = False,
    percentile: float = PERCENTILE,
    exported: torch.fx.GraphModule | None = None,
    reduce_range: bool | None = None,
) -> torch.fx.GraphModule:
    """A copy of ``model`` (or of ``exported``, its exported graph) with observers in place (``qat``: fake
    quantization, for quantization-aware training)."""
    ao = _ao()
    q = quantizer(observer, keep_float, qat, percentile, reduce_range)
    with quiet():
        graph = (
            copy.deepcopy(exported) if exported is not None else export(copy.deepcopy(model).cpu().eval(), input_shape)
        )
        one_partition_per_call(graph)
        if qat:
            with patterns():
                prepared = ao.q.prepare_qat_pt2e(graph, q)
        else:
            with bn_folded_where_alone():
                prepared = ao.q.prepare_pt2e(graph, q)
    return prepared


def train_mode(prepared: torch.fx.GraphModule, training: bool) -> None:
    """An exported graph has no train/eval switch of its own: torchao's moves batch norm and dropout."""
    ao = _ao()
    with quiet(), patterns():  # torchao makes six patterns with torch.export on every switch: made once
        if training:
            ao.pt2e.move_exported_model_to_train(prepared)
        else:
            ao.pt2e.move_exported_model_to_eval(prepared)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The reference INT8 graph of a calibrated (or trained) prepared graph: integer weights folded in as
    constants, activations quantized and dequantized around the float ops the compiler fuses."""
    ao = _ao()
    with quiet(), patterns():
        q = ao.q.convert_pt2e(prepared.cpu())
    _mode_recorded_only(q)
    return q


def _mode_recorded_only(graph: torch.fx.GraphModule) -> None:
    """``.train()`` / ``.eval()`` allowed on a converted graph, recording the mode and changing nothing: its batch
    norms are folded into the convolutions and its dropouts were exported (or switched before converting) in eval
    mode. torchao's own switch (``allow_exported_model_train_eval``) makes six patterns with torch.export on every
    call: seconds for each ``Int8Model(...).eval()``, for the same graph."""

    def train(self, mode: bool = True):
        self.training = mode
        return self

    graph.train = types.MethodType(train, graph)  # type: ignore[method-assign]
    graph.eval = types.MethodType(lambda self: self.train(False), graph)  # type: ignore[method-assign]


# --- what a converted graph's numbers are, and putting them back -------------------------------------------


def is_qdq(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(str(node.target) == f"quantized_decomposed.{n}.default" for n in QDQ)


def constants(graph: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the converted graph reads (``get_attr``): integer weights, their scales and zero points,
    float biases and weights of the layers kept float, by name."""
    out = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr" and node.target not in out:
            t = _attr(graph, node.target)
            if isinstance(t, torch.Tensor):
                out[node.target] = t
    return out


def _attr(graph: nn.Module, target: str):
    obj: Any = graph
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def activation_qparams(graph: torch.fx.GraphModule) -> dict[str, list]:
    """Each activation quantize / dequantize node's ``[scale, zero_point, quant_min, quant_max]``, by node name."""
    out = {}
    for node in graph.graph.nodes:
        if is_qdq(node):
            _, scale, zp, qmin, qmax, _dtype = node.args[:6]
            out[node.name] = [float(scale), int(zp), int(qmin), int(qmax)]
    return out


def int8_layers(graph: torch.fx.GraphModule) -> list[str]:
    """The modules (by name in the float model) whose convolution or linear layer runs on INT8 weights."""
    out = []
    for node in graph.graph.nodes:
        if node.op == "call_function" and str(node.target) in ("aten.conv2d.default", "aten.linear.default"):
            w = node.args[1] if len(node.args) > 1 else None
            if isinstance(w, torch.fx.Node) and "dequantize_per_channel" in str(w.target):
                stack = node.meta.get("nn_module_stack") or {}
                # a module called twice: its second call renamed for torchao's matcher (one_partition_per_call)
                out.append(list(stack.values())[-1][0].split(CALL)[0] if stack else node.name)
    return out


# A scale is a float32 between the smallest normal one and 2^64: the kernels multiply by 1 / scale, which a
# subnormal, zero, negative, infinite or NaN scale makes infinite or NaN (and a file's 1e-300 is 0 in float32)
MIN_SCALE, MAX_SCALE = torch.finfo(torch.float32).tiny, 2.0**64


def scale_ok(s: float) -> bool:
    return MIN_SCALE <= s < MAX_SCALE  # (False for NaN)


def scales_ok(scales: torch.Tensor) -> bool:
    """Whether every one of ``scales`` is a scale (``scale_ok``), as float32 holds it."""
    s = scales.double()
    return not s.numel() or bool(((s >= MIN_SCALE) & (s < MAX_SCALE)).all())


PER_CHANNEL = ("quantize_per_channel", "dequantize_per_channel")  # args: x, scales, zero points, axis, min, max


def _check_weights(graph: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> None:
    """The constants that are a weight's quantization, by the nodes that read them: each scale a scale, every
    zero point 0 (the x86 quantizer's weights are symmetric, and its compiled kernels assume it: a zero point
    of 5 moves their output while the reference graph's follows it), each integer within its grid."""
    for node in graph.graph.nodes:
        parts = str(node.target).split(".")
        if not (node.op == "call_function" and parts[0] == "quantized_decomposed" and parts[1] in PER_CHANNEL):
            continue
        x, scales, zps = (_attr_name(a) for a in node.args[:3])
        qmin, qmax = node.args[4:6]
        if scales is not None and not scales_ok(tensors[scales]):
            raise InputError(f"INT8 file: {scales} has a scale that is not a finite positive number")
        if zps is not None and bool(tensors[zps].any()):
            raise InputError(f"INT8 file: {zps} has a zero point other than 0 (its weights are symmetric)")
        if x is not None and tensors[x].numel() and not qmin <= int(tensors[x].min()) <= int(tensors[x].max()) <= qmax:
            raise InputError(f"INT8 file: {x} has integers outside [{qmin}, {qmax}]")


def _attr_name(arg: Any) -> str | None:
    """The constant a node's argument reads, or None (a computed tensor)."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and isinstance(arg.target, str):
        return arg.target
    return None


def load_numbers(graph: torch.fx.GraphModule, tensors: dict[str, torch.Tensor], qparams: dict[str, list]) -> None:
    """Put a file's numbers into ``graph`` (the same architecture converted again, uncalibrated): every constant
    and every activation's scale and zero point. The names, shapes, dtypes and grids must be exactly those of
    ``graph``, and every weight's scales, zero points and integers in range (checked before anything is
    changed). Float constants (biases, the weights of layers kept float) are numbers as a float model's are."""
    own = constants(graph)
    if set(own) != set(tensors):
        raise InputError("INT8 file: its INT8 constants do not match its float model")
    for name, t in own.items():
        new = tensors[name]
        if new.shape != t.shape or new.dtype != t.dtype:
            raise InputError(f"INT8 file: {name} does not match its float model")
    _check_weights(graph, tensors)
    own_q = activation_qparams(graph)
    if set(own_q) != set(qparams):
        raise InputError("INT8 file: its activation ranges do not match its float model")
    for name, (_, _, qmin, qmax) in own_q.items():
        s, z, lo, hi = qparams[name]
        if (lo, hi) != (qmin, qmax):
            raise InputError(f"INT8 file: {name} has another integer grid than its float model")
        if not scale_ok(s) or not (qmin <= z <= qmax):
            raise InputError(f"INT8 file: {name} has a scale or zero point out of range")
    for name in own:
        parent, _, attr = name.rpartition(".")
        holder = graph.get_submodule(parent) if parent else graph
        old = getattr(holder, attr)
        new = tensors[name].clone()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
        if attr in holder._buffers:
            holder._buffers[attr] = new
        elif attr in holder._parameters:
            holder._parameters[attr] = new  # type: ignore[assignment]
        else:
            setattr(holder, attr, new)
    for node in graph.graph.nodes:
        if is_qdq(node):
            s, z = qparams[node.name][:2]
            node.args = (node.args[0], float(s), int(z), *node.args[3:])
    graph.recompile()


# --- running it: compiled once per shape, lazily -------------------------------------------------------------


def compile_enabled() -> bool:
    """Whether a PT2E model is compiled before it runs (COMPRESS_INT8_COMPILE=0 runs the reference graph:
    the same integers, float arithmetic between them, slower; for a machine without a compiler)."""
    return os.environ.get("COMPRESS_INT8_COMPILE", "1") != "0" and compiler() is not None


# the most a compiled graph's output may differ from its reference graph's (relative L2 norm) on the first call at a
# shape: measured 1e-7 at batch 1 and 7e-4 / 4e-3 at batch 32 for ResNet-20 / DenseNet-40-BC (integer kernels
# round where the reference computes in float), 0.26 / 0.53 for ShuffleNetV2, whose compiled graph inductor gets
# wrong (MNIST test: 61.8% compiled against 74.9% for its reference graph and 75.75% in FP32)
MAX_COMPILED_ERROR = 0.05


class Runner:
    """Runs a converted graph: compiled by inductor (weights frozen) on the first call at each input shape,
    whose seconds are kept in ``compile_seconds`` (not in any latency). That first call also runs the reference
    graph and compares: where the compiled graph computes other numbers (``MAX_COMPILED_ERROR``), the reference
    graph runs from then on and ``failed`` says why."""

    def __init__(self, graph: torch.fx.GraphModule):
        self.graph = graph
        self.compiled: Any = None
        self.compile_seconds: dict[str, float] = {}
        self.failed: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not compile_enabled() or self.failed is not None:
            with quiet():
                return self.graph(x)
        key = "x".join(str(d) for d in x.shape)
        if key in self.compile_seconds:  # compiled at this shape: the call alone (no logger levels set, no config
            with torch.no_grad():  # patched: those took 0.8 ms a call, a third of a batch-1 ResNet-20)
                return self.compiled(x)
        import torch._inductor.config as inductor_config

        with torch.no_grad(), quiet(), inductor_config.patch(freezing=True):
            t0 = time.perf_counter()
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.graph, dynamic=False)
                out = self.compiled(x)
            except Exception as e:  # inductor could not compile it: the reference graph runs (same integers)
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                return self.graph(x)
            self.compile_seconds[key] = round(time.perf_counter() - t0, 2)
            ref = self.graph(x)
            err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
            if not err <= MAX_COMPILED_ERROR:  # NaN too
                self.failed = f"its outputs differed from the reference graph's by {err:.1%} at input {key}"
                return ref
            return out
