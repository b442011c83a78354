"""Static INT8 that PyTorch executes as integers: weights per channel, activations per tensor, both calibrated.

The pieces of the lowering (the ``int8`` method, ``int8_stage.py``, drives them): ``prepare`` traces a copy
of the model through PyTorch's own FX graph-mode quantization for the x86 backend (fbgemm / oneDNN kernels;
conv-bn-relu fused; observers, or fake quantization for QAT), ``calibrate`` runs calibration batches through
its observers, ``convert`` makes the ``Int8Model`` whose convs and linears run INT8 on the CPU. compress writes
no kernels.

An INT8 model is an FX ``GraphModule`` -- generated code -- so it is never pickled. Its file holds data only:
the float architecture with its weights zeroed as a .cpz (``compress_cpz``, a few KB), the INT8 state packed by
dtype (each quantized tensor as its integers, scales and zero points) with an index, and a small table naming
the backend, the observer, the input shape and the model's metadata (docs/format.md). Loading rebuilds the same INT8 model from the architecture (trace, prepare,
convert: compress's own code on classes the .cpz may name) and loads the checked state into it: no trust
needed (``compress.formats.load_model``). ``torch.backends.quantized.engine`` is set to the file's backend.

Torch 2.13 marks its quantized tensors deprecated (pytorch/pytorch#184982) in favour of torchao's PT2E flow
with ``torch.compile``; the kernels still run, and their warnings are kept inside this module.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import json
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..data import Data, batches
from ..errors import InputError, UsageError
from ..meta import META_ATTR, get_meta

INT8_KEY = "compress_int8"  # the table in an INT8 file: {"version", "backend", "observer", "input_shape", ...}
FILE_VERSION = 2  # 2: the state packed into one buffer per dtype + an index (1: one tensor per entry; still read)
# activation ranges: the histogram's least-error range, min-max, or a percentile of each batch's values (averaged)
OBSERVERS = ("histogram", "minmax", "percentile")
PERCENTILE = 99.99
CALIB_SAMPLES = 512
BACKENDS = ("x86", "qnnpack")  # x86 CPUs (fbgemm / oneDNN); ARM (phones, Apple silicon, Raspberry Pi): QNNPACK


def _require_fx() -> None:
    """torch.ao's FX flow is deprecated in torch 2.13 (pytorch/pytorch#184982): a later torch may not have it."""
    try:
        importlib.import_module("torch.ao.quantization.quantize_fx")  # (an `import torch.ao...` here would bind torch)
    except ImportError as e:
        raise UsageError(f"this PyTorch ({torch.__version__}) has no FX INT8 flow (torch.ao.quantization); use "
                         "export --int8 (ONNX Runtime or OpenVINO)") from e


def backend() -> str:
    """The INT8 kernels this machine has: x86's where PyTorch ships them, else QNNPACK's."""
    _require_fx()
    engines = torch.backends.quantized.supported_engines
    for b in BACKENDS:
        if b in engines:
            return b
    raise UsageError(f"this PyTorch build has no INT8 CPU kernels ({', '.join(engines) or 'none'}); use export "
                     "--int8 (ONNX Runtime)")


@contextlib.contextmanager
def _quiet():
    """torch.ao's flow, its observers and its quantized tensors announce their deprecation on every call
    (DeprecationWarning and UserWarning alike); nothing else runs in here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.cache
def _percentile_observer_class():
    """torch.ao's MinMaxObserver with the range from percentiles (TensorRT's "percentile" calibration): per
    batch, the ``100 - p`` and ``p`` percentiles of the values (of at most 2^20 evenly strided ones), averaged
    over batches; outliers beyond them saturate instead of stretching the grid for everything else. Made on
    first use: torch.ao loads lazily."""
    from torch.ao.quantization.observer import MinMaxObserver

    class _Percentile(MinMaxObserver):
        def __init__(self, percentile: float = PERCENTILE, **kw):
            super().__init__(**kw)
            self.percentile = percentile
            self.register_buffer("batches", torch.tensor(0))

        def forward(self, x_orig):
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().float().flatten()
            x = x[:: max(1, x.numel() >> 20)]
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=x.device)
            lo, hi = torch.quantile(x, q)
            n = int(self.batches)
            if n == 0:
                self.min_val.resize_(lo.shape)
                self.max_val.resize_(hi.shape)
                self.min_val.copy_(lo)
                self.max_val.copy_(hi)
            else:  # the running mean of the batches' percentiles
                self.min_val.copy_(self.min_val + (lo - self.min_val) / (n + 1))
                self.max_val.copy_(self.max_val + (hi - self.max_val) / (n + 1))
            self.batches += 1
            return x_orig

    return _Percentile


def _qconfig_mapping(observer: str, keep_float: tuple[str, ...] = (), engine: str = "x86", qat: bool = False,
                     percentile: float = PERCENTILE):
    """torch.ao's default mapping for ``engine`` (per-channel symmetric int8 weights, uint8 activations; with
    ``qat`` fake-quantized for training), its activation observer replaced as ``observer`` says."""
    from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver

    if observer not in OBSERVERS:
        raise UsageError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    if qat:  # moving-average ranges learned while training: the observer is the QAT flow's own
        mapping = get_default_qat_qconfig_mapping(engine)
    else:
        mapping = get_default_qconfig_mapping(engine)
        weight = mapping.global_qconfig.weight if mapping.global_qconfig is not None else None
        # reduce_range as x86's default does (no overflow without VNNI); QNNPACK uses the full range
        if observer == "minmax":
            act = MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=engine == "x86")
            mapping = mapping.set_global(QConfig(activation=act, weight=weight))
        elif observer == "percentile":
            act = _percentile_observer_class().with_args(percentile=percentile, dtype=torch.quint8,
                                                         reduce_range=engine == "x86")
            mapping = mapping.set_global(QConfig(activation=act, weight=weight))
    for name in keep_float:  # these layers stay float: the graph dequantizes before them, quantizes after
        mapping = mapping.set_module_name(name, None)
    return mapping


def native_activations(model: nn.Module) -> list[str]:
    """Parameter-free leaf modules that compute hard-swish or hard-sigmoid by hand (``x * relu6(x + 3) / 6``, as
    pytorchcv's HSwish does) are replaced in ``model`` by torch's own ``nn.Hardswish`` / ``nn.Hardsigmoid``
    (judged by what they compute on a probe, not by name); returns their names. Traced as written, every
    intermediate of the formula would be quantized: an undertrained MobileNetV3-small lost 7.6 pt to PTQ instead
    of 2.7, and its QAT fell to 16% instead of rising to 63%."""
    import torch.nn.functional as F

    probe = torch.linspace(-8.0, 8.0, 289).reshape(1, 1, 17, 17)
    targets = ((nn.Hardswish, F.hardswish), (nn.Hardsigmoid, F.hardsigmoid))
    swapped = []
    for name, mod in list(model.named_modules()):
        if not name or isinstance(mod, (nn.Hardswish, nn.Hardsigmoid)) or any(True for _ in mod.children()) \
                or any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
            continue
        try:
            with torch.no_grad():
                out = mod(probe.clone())
        except Exception:  # noqa: BLE001  (a module that takes no single tensor is not an activation)
            continue
        for cls, fn in targets:
            if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(out, fn(probe), atol=1e-5):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, cls())
                swapped.append(name)
                break
    return swapped


def prepare(model: nn.Module, input_shape, observer: str = "histogram", keep_float: tuple[str, ...] = (),
            engine: str = "x86", qat: bool = False, percentile: float = PERCENTILE,
            native: bool = True) -> torch.fx.GraphModule:
    """A copy of ``model`` prepared for ``engine``'s INT8 kernels: traced, conv-bn-relu fused, observers in place
    (``qat``: fake-quantized in training mode, for quantization-aware training). ``keep_float``: layer names
    left in float. ``native``: hand-written hard-swish / hard-sigmoid become torch's (``native_activations``;
    files written before compress did this rebuild without it)."""
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise InputError(f"this model was made for {engine} INT8 kernels, which this PyTorch build lacks "
                         f"({', '.join(torch.backends.quantized.supported_engines)}); quantize it again here")
    torch.backends.quantized.engine = engine
    example = torch.zeros(tuple(input_shape))
    mapping = _qconfig_mapping(observer, keep_float, engine, qat, percentile)
    work = copy.deepcopy(model).cpu()
    swapped = native_activations(work) if native else []
    try:
        with _quiet():
            if qat:
                prepared = prepare_qat_fx(work.train(), mapping, (example,))
            else:
                prepared = prepare_fx(work.eval(), mapping, (example,))
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as e:
        raise InputError(f"the model cannot be traced for INT8 execution ({str(e).splitlines()[0][:160]}); "
                         "keep it float, or use export --int8 (ONNX Runtime)") from e
    setattr(prepared, "native_activations", swapped)  # what was replaced, for the stage's notes (a Module attribute)
    return prepared


def calibrate(prepared: nn.Module, calib: Data, samples: int = CALIB_SAMPLES) -> int:
    """Run up to ``samples`` samples of ``calib`` through ``prepared``'s observers; returns how many ran.
    NaN or infinite inputs are refused (they would set every range they reach)."""
    if calib is None or len(calib) == 0:
        raise UsageError("INT8 activations need calibration data (--calib-data SPEC): none was given")
    seen = 0
    with _quiet(), torch.no_grad():
        for x, _ in batches(calib, 64, torch.arange(min(samples, len(calib)))):
            if not bool(torch.isfinite(x).all()):
                raise InputError(f"calibration data {calib.name}: NaN or infinite values")
            prepared(x.float())
            seen += len(x)
    return seen


def convert(prepared: torch.fx.GraphModule, table: dict, float_model: nn.Module) -> "Int8Model":
    """The INT8 model of a calibrated (or QAT-trained) prepared model; ``table`` says how it was made."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        q = convert_fx(prepared.cpu().eval())
    return Int8Model(q, {"version": 1, **table}, float_model).eval()


class Int8Model(nn.Module):
    """An INT8 model: ``inner`` (the converted FX graph) runs; ``compress_int8`` says how it was made;
    ``arch_cpz`` is its float architecture (weights zeroed) as .cpz bytes, what its file stores and rebuilds
    it from -- a few kilobytes, so no float copy of the weights stays in memory."""

    # its layers are packed INT8 kernels: a .cpz cannot hold them (``coding.container`` refuses it) and no method
    # can change them (``stages.Method`` refuses it)
    int8_kernels = True

    def __init__(self, inner: nn.Module, table: dict, float_model: nn.Module, arch_cpz: bytes | None = None):
        super().__init__()
        self.inner = inner
        self.compress_int8 = dict(table)
        self.arch_cpz = arch_cpz if arch_cpz is not None else _arch_bytes(float_model)
        # the float model's metadata as it is (a file's may hold keys of a newer compress), and its input shape
        setattr(self, META_ATTR, {**copy.deepcopy(get_meta(float_model)), "input_shape": list(table["input_shape"])})
        from ..counting import count_macs, count_params

        # its parameters and MACs are the float architecture's (as integers), counted while it is at hand: decoding
        # the architecture again may need the user's --arch
        self.params = count_params(float_model)
        self.macs = count_macs(float_model, table["input_shape"])

    def nonzeros(self) -> int:
        """Nonzero weights and biases of its INT8 layers (a pruned weight's integer is 0: its zero point)."""
        n = 0
        with _quiet():
            for v in self.inner.state_dict().values():
                for t in (v if isinstance(v, tuple) else (v,)):
                    if isinstance(t, torch.Tensor) and t.is_quantized and t.qscheme() == torch.per_channel_affine:
                        n += int(torch.count_nonzero(t.int_repr()))
                    elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1:
                        n += int(torch.count_nonzero(t))
        return n

    def forward(self, x):
        with _quiet():
            return self.inner(x.float())


def _flat(key: str, v, out: dict) -> None:
    """A state entry as plain tensors: a quantized tensor as its integers and its scales and zero points
    (never torch's pickled quantized tensors), a packed (weight, bias) pair element by element."""
    if isinstance(v, torch.Tensor) and v.is_quantized:
        out[f"{key}#int"] = v.int_repr()
        if v.qscheme() == torch.per_channel_affine:
            out[f"{key}#scales"] = v.q_per_channel_scales().float()
            out[f"{key}#zero_points"] = v.q_per_channel_zero_points().int()
        else:
            out[f"{key}#scales"] = torch.tensor([v.q_scale()], dtype=torch.float32)
            out[f"{key}#zero_points"] = torch.tensor([v.q_zero_point()], dtype=torch.int32)
    elif isinstance(v, torch.Tensor):
        out[key] = v.detach().clone()
    elif isinstance(v, tuple):
        for i, x in enumerate(v):
            if x is not None:
                _flat(f"{key}#{i}", x, out)


def _tensor(flat: dict, key: str) -> torch.Tensor:
    t = flat.get(key)
    if not isinstance(t, torch.Tensor):
        raise InputError(f"INT8 file: {key} is missing")
    return t


def _unflat(key: str, own, flat: dict):
    """The entry ``own`` (the rebuilt model's, which says what it is) filled from the file's plain tensors;
    every length and dtype checked against ``own``."""
    if isinstance(own, torch.Tensor) and own.is_quantized:
        ints, scales, zps = (_tensor(flat, f"{key}#{p}") for p in ("int", "scales", "zero_points"))
        if ints.shape != own.shape or ints.dtype != own.int_repr().dtype:
            raise InputError(f"INT8 file: {key} does not match its float model")
        if own.qscheme() == torch.per_channel_affine:
            axis = own.q_per_channel_axis()
            if scales.shape != (own.shape[axis],) or zps.shape != scales.shape:
                raise InputError(f"INT8 file: {key} has the wrong number of scales")
            return torch._make_per_channel_quantized_tensor(ints, scales.double(), zps.long(), axis)
        if scales.numel() != 1 or zps.numel() != 1:
            raise InputError(f"INT8 file: {key} has the wrong number of scales")
        return torch._make_per_tensor_quantized_tensor(ints, float(scales[0]), int(zps[0]))
    if isinstance(own, torch.Tensor):
        t = _tensor(flat, key)
        if t.shape != own.shape or t.dtype != own.dtype:
            raise InputError(f"INT8 file: {key} does not match its float model")
        return t
    if isinstance(own, tuple):
        return tuple(None if x is None else _unflat(f"{key}#{i}", x, flat) for i, x in enumerate(own))
    return own  # a dtype or other constant of the rebuilt model itself


def _arch_bytes(float_model: nn.Module) -> bytes:
    """The float model with every float tensor zeroed, as .cpz bytes: its architecture, which is all the INT8
    model is rebuilt from (its INT8 state carries every number it runs with)."""
    from ..coding.container import encode_model

    skeleton = copy.deepcopy(float_model)
    with torch.no_grad():
        for t in skeleton.state_dict().values():
            if t.is_floating_point():
                t.zero_()
    blob, _ = encode_model(skeleton)
    return blob


def payload(model: Int8Model) -> dict[str, Any]:
    """What an INT8 file holds besides the float model: the table and the INT8 state as plain tensors."""
    flat: dict[str, torch.Tensor] = {}
    with _quiet():
        for k, v in model.inner.state_dict().items():
            _flat(k, v, flat)
    # the model's metadata (its history since the conversion too) as JSON text: the table holds plain values only
    meta = json.dumps(get_meta(model), default=str)
    buffers, index = _pack(flat)
    return {INT8_KEY: {**model.compress_int8, "version": FILE_VERSION, "meta": meta, "index": index},
            "int8_state": buffers}


PACKED = {str(d).removeprefix("torch."): d for d in (torch.int8, torch.uint8, torch.int32, torch.int64, torch.float32)}


def _pack(flat: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
    """The entries as one flat buffer per dtype and an index ``[[name, dtype, shape, offset], ...]``: a few
    records in the file instead of one per tensor (each costs ~300 bytes of archive: 45 KB on ResNet-20)."""
    parts: dict[str, list[torch.Tensor]] = {}
    used: dict[str, int] = {}
    index = []
    for k, t in flat.items():
        dt = str(t.dtype).removeprefix("torch.")
        index.append([k, dt, list(t.shape), used.get(dt, 0)])
        parts.setdefault(dt, []).append(t.reshape(-1))
        used[dt] = used.get(dt, 0) + t.numel()
    return {dt: torch.cat(ts) for dt, ts in parts.items()}, index


def _unpack(buffers: Any, index: Any) -> dict[str, torch.Tensor]:
    """The entries of a packed state, every index row checked against its buffer before it is sliced
    (views: nothing is copied or allocated on a file's word)."""
    if not (isinstance(buffers, dict) and set(buffers) <= set(PACKED)
            and all(isinstance(b, torch.Tensor) and b.dim() == 1 and b.dtype == PACKED[dt] for dt, b in buffers.items())):
        raise InputError("INT8 file: its INT8 state is not buffers of the dtypes this compress writes")
    if not isinstance(index, list) or len(index) > 1_000_000:
        raise InputError("INT8 file: its state index is not a list")
    out: dict[str, torch.Tensor] = {}
    for row in index:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and row[1] in buffers
                and isinstance(row[2], list) and len(row[2]) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in row[2])
                and isinstance(row[3], int) and not isinstance(row[3], bool) and row[3] >= 0):
            raise InputError("INT8 file: a row of its state index is damaged")
        name, dt, shape, off = row
        n = 1
        for d in shape:
            n *= d
        if off + n > len(buffers[dt]) or name in out:
            raise InputError(f"INT8 file: {name} lies outside its buffer or is listed twice")
        out[name] = buffers[dt][off:off + n].view(shape)
    return out


def file_size(model: Int8Model) -> int:
    """The bytes of the file ``formats.save_model`` writes for ``model``."""
    from ..io import wrapped_size

    return wrapped_size(model.arch_cpz, payload(model))


def rebuild(float_model: nn.Module, table: Any, state: Any, arch_cpz: bytes | None = None) -> Int8Model:
    """The INT8 model a file describes, from its float architecture (decoded from ``arch_cpz``, the file's bytes
    of it): prepared and converted by compress, then the file's INT8 state (checked: the same names and shapes)
    loaded into it."""
    _require_fx()
    from torch.ao.quantization.quantize_fx import convert_fx

    if not (isinstance(table, dict) and table.get("version") in (1, FILE_VERSION) and table.get("backend") in BACKENDS
            and table.get("observer") in OBSERVERS and all(isinstance(v, (str, int, list)) for v in table.values())):
        raise InputError("INT8 file: its table is not one this compress writes")
    table = dict(table)
    meta = _meta(table.pop("meta", "{}"))
    if table["version"] == FILE_VERSION:
        state = _unpack(state, table.pop("index", None))
    shape = table.get("input_shape")
    if not (isinstance(shape, list) and 2 <= len(shape) <= 5 and all(isinstance(s, int) and 0 < s < 1 << 16
                                                                      for s in shape)):
        raise InputError("INT8 file: bad input shape")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("INT8 file: its INT8 state is not a table of tensors")
    kept, native = table.get("keep_float", []), table.get("native_activations")
    for names in (kept, [] if native is None else native):
        if not (isinstance(names, list) and len(names) <= 10_000 and all(isinstance(n, str) and len(n) < 512
                                                                          for n in names)):
            raise InputError("INT8 file: its float layers or activations are not a list of layer names")
    known = {n for n, _ in float_model.named_modules()}
    if not set(kept) <= known:
        raise InputError("INT8 file: it keeps float a layer its architecture does not have")
    with _quiet():
        prepared = prepare(float_model, shape, table["observer"], tuple(kept), table["backend"],
                           native=native is not None)
        if native is not None and sorted(getattr(prepared, "native_activations", [])) != sorted(native):
            raise InputError("INT8 file: its activations do not match its float model")
        q = convert_fx(prepared)
        own = q.state_dict()
        expected: dict[str, torch.Tensor] = {}
        for k, v in own.items():
            _flat(k, v, expected)
        if set(expected) != set(state):
            raise InputError("INT8 file: its INT8 state does not match its float model")
        filled = type(own)((k, _unflat(k, v, state)) for k, v in own.items())
        filled._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]  # the modules' versions
        q.load_state_dict(filled)
    model = Int8Model(q, table, float_model.eval(), arch_cpz).eval()
    setattr(model, META_ATTR, {**get_meta(model), **meta})
    return model


MAX_META_CHARS = 1 << 20


def _meta(text: Any) -> dict:
    """The metadata an INT8 file's table carries: JSON text of a table (parsed as data; every field is checked
    where it is read, ``meta.read_meta``)."""
    if not isinstance(text, str) or len(text) > MAX_META_CHARS:
        raise InputError("INT8 file: its metadata is not JSON text of a sensible size")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise InputError("INT8 file: its metadata is not JSON") from e
    if not isinstance(meta, dict):
        raise InputError("INT8 file: its metadata is not a table")
    return meta
