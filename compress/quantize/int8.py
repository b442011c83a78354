"""Static INT8 that PyTorch executes as integers: weights per channel, activations per tensor, both calibrated.

``to_int8(model, calib, input_shape)`` lowers a float model through PyTorch's own FX graph-mode quantization
for the x86 backend (fbgemm / oneDNN kernels; conv-bn-relu fused; observers on calibration batches): its
convs and linears then run INT8 on the CPU. compress writes no kernels.

An INT8 model is an FX ``GraphModule`` -- generated code -- so it is never pickled. Its file holds data only:
the float architecture with its weights zeroed as a .cpz (``compress_cpz``, a few KB), the INT8 state as plain
tensors (each quantized tensor as its integers, scales and zero points), and a small table naming the backend,
the observer and the input shape. Loading rebuilds the same INT8 model from the architecture (trace, prepare,
convert: compress's own code on classes the .cpz may name) and loads the checked state into it: no trust
needed (``compress.formats.load_model``). ``torch.backends.quantized.engine`` is set to the file's backend.

Torch 2.13 marks its quantized tensors deprecated (pytorch/pytorch#184982) in favour of torchao's PT2E flow
with ``torch.compile``; the kernels still run, and their warnings are kept inside this module.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..config import Select
from ..data import Data, batches, check_fits
from ..errors import InputError, UsageError
from ..meta import META_ATTR, get_meta

INT8_KEY = "compress_int8"  # the table in an INT8 file: {"version", "backend", "observer", "input_shape"}
OBSERVERS = ("minmax", "histogram")  # activation ranges: min-max, or the histogram's least-error range
CALIB_SAMPLES = 512
BACKENDS = ("x86", "qnnpack")  # x86 CPUs (fbgemm / oneDNN); ARM (phones, Apple silicon, Raspberry Pi): QNNPACK


def backend() -> str:
    """The INT8 kernels this machine has: x86's where PyTorch ships them, else QNNPACK's."""
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


def _qconfig_mapping(observer: str, keep_float: tuple[str, ...] = (), engine: str = "x86"):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver

    mapping = get_default_qconfig_mapping(engine)  # per-channel symmetric int8 weights (x86), uint8 activations
    if observer == "minmax":
        weight = mapping.global_qconfig.weight if mapping.global_qconfig is not None else None
        # reduce_range as x86's default does (no overflow without VNNI); QNNPACK uses the full range
        act = MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=engine == "x86")
        mapping = mapping.set_global(QConfig(activation=act, weight=weight))
    elif observer != "histogram":
        raise UsageError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    for name in keep_float:  # these layers stay float: the graph dequantizes before them, quantizes after
        mapping = mapping.set_module_name(name, None)
    return mapping


def float_layers(model: nn.Module, patterns) -> tuple[str, ...]:
    """Names of the Conv/Linear layers that ``patterns`` (globs of layer names) keep in float; a pattern that
    matches none is an error (``Select``'s rule)."""
    if not patterns:
        return ()
    return tuple(sorted(n for n, _ in Select(names=tuple(patterns), spare_first_last=False).layers(model)))


def _skeleton(model: nn.Module, observer: str, input_shape, keep_float: tuple[str, ...] = (),
              engine: str = "x86") -> torch.fx.GraphModule:
    """The prepared (observed) FX model of ``model`` for ``engine``'s kernels: traced, fused, observers in place."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise InputError(f"this model was made for {engine} INT8 kernels, which this PyTorch build lacks "
                         f"({', '.join(torch.backends.quantized.supported_engines)}); quantize it again here")
    torch.backends.quantized.engine = engine
    example = torch.zeros(tuple(input_shape))
    try:
        return prepare_fx(copy.deepcopy(model).eval(), _qconfig_mapping(observer, keep_float, engine), (example,))
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as e:
        raise InputError(f"the model cannot be traced for INT8 execution ({str(e).splitlines()[0][:160]}); "
                         "keep it float, or use export --int8 (ONNX Runtime)") from e


class Int8Model(nn.Module):
    """An INT8 model: ``inner`` (the converted FX graph) runs; ``compress_int8`` says how it was made;
    ``arch_cpz`` is its float architecture (weights zeroed) as .cpz bytes, what its file stores and rebuilds
    it from -- a few kilobytes, so no float copy of the weights stays in memory."""

    def __init__(self, inner: nn.Module, table: dict, float_model: nn.Module, arch_cpz: bytes | None = None):
        super().__init__()
        self.inner = inner
        self.compress_int8 = dict(table)
        self.arch_cpz = arch_cpz if arch_cpz is not None else _arch_bytes(float_model)
        # the float model's metadata as it is (a file's may hold keys of a newer compress), and its input shape
        setattr(self, META_ATTR, {**get_meta(float_model), "input_shape": list(table["input_shape"])})

    def architecture(self) -> nn.Module:
        """The float architecture (zero weights): for counting its parameters and MACs."""
        from ..coding.container import decode_model

        return decode_model(self.arch_cpz)

    def forward(self, x):
        with _quiet():
            return self.inner(x.float())


def to_int8(model: nn.Module, calib: Data, input_shape, observer: str = "histogram",
            samples: int = CALIB_SAMPLES, keep_float=()) -> Int8Model:
    """An INT8 copy of ``model`` calibrated on up to ``samples`` samples of ``calib`` (the model is unchanged);
    ``keep_float``: globs of layer names left in float (a sensitive first or last layer)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if calib is None or len(calib) == 0:
        raise UsageError("INT8 activations need calibration data (--calib-data SPEC): none was given")
    check_fits(model, calib, labels_needed=False)  # the data's samples are what the model takes
    kept = float_layers(model, keep_float)
    engine = backend()
    with _quiet():
        prepared = _skeleton(model, observer, input_shape, kept, engine)
        seen = 0
        with torch.no_grad():
            for x, _ in batches(calib, 64, torch.arange(min(samples, len(calib)))):
                if not bool(torch.isfinite(x).all()):
                    raise InputError(f"calibration data {calib.name}: NaN or infinite values")
                prepared(x.float())
                seen += len(x)
        q = convert_fx(prepared)
    table = {"version": 1, "backend": engine, "observer": observer, "input_shape": list(input_shape),
             "calibration": f"{calib.name}, {seen} samples", "keep_float": list(kept)}
    return Int8Model(q, table, model).eval()


def _flat(key: str, v, out: dict) -> None:
    """A state entry as plain tensors: a quantized tensor as its integers and its scales and zero points
    (never torch's pickled quantized tensors), a packed (weight, bias) pair element by element."""
    if isinstance(v, torch.Tensor) and v.is_quantized:
        out[f"{key}#int"] = v.int_repr()
        if v.qscheme() == torch.per_channel_affine:
            out[f"{key}#scales"] = v.q_per_channel_scales().float()
            out[f"{key}#zero_points"] = v.q_per_channel_zero_points()
        else:
            out[f"{key}#scales"] = torch.tensor([v.q_scale()], dtype=torch.float32)
            out[f"{key}#zero_points"] = torch.tensor([v.q_zero_point()])
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
    return {INT8_KEY: dict(model.compress_int8), "int8_state": flat}


def rebuild(float_model: nn.Module, table: Any, state: Any, arch_cpz: bytes | None = None) -> Int8Model:
    """The INT8 model a file describes, from its float architecture (decoded from ``arch_cpz``, the file's bytes
    of it): prepared and converted by compress, then the file's INT8 state (checked: the same names and shapes)
    loaded into it."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if not (isinstance(table, dict) and table.get("version") == 1 and table.get("backend") in BACKENDS
            and table.get("observer") in OBSERVERS and all(isinstance(v, (str, int, list)) for v in table.values())):
        raise InputError("INT8 file: its table is not one this compress writes")
    shape = table.get("input_shape")
    if not (isinstance(shape, list) and 2 <= len(shape) <= 5 and all(isinstance(s, int) and 0 < s < 1 << 16
                                                                      for s in shape)):
        raise InputError("INT8 file: bad input shape")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("INT8 file: its INT8 state is not a table of tensors")
    kept = table.get("keep_float", [])
    if not (isinstance(kept, list) and len(kept) <= 10_000 and all(isinstance(n, str) and len(n) < 512 for n in kept)):
        raise InputError("INT8 file: its float layers are not a list of layer names")
    known = {n for n, _ in float_model.named_modules()}
    if not set(kept) <= known:
        raise InputError("INT8 file: it keeps float a layer its architecture does not have")
    with _quiet():
        q = convert_fx(_skeleton(float_model, table["observer"], shape, tuple(kept), table["backend"]))
        own = q.state_dict()
        expected: dict[str, torch.Tensor] = {}
        for k, v in own.items():
            _flat(k, v, expected)
        if set(expected) != set(state):
            raise InputError("INT8 file: its INT8 state does not match its float model")
        filled = type(own)((k, _unflat(k, v, state)) for k, v in own.items())
        filled._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]  # the modules' versions
        q.load_state_dict(filled)
    return Int8Model(q, table, float_model.eval(), arch_cpz).eval()
