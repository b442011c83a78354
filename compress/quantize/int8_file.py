"""The INT8 model's file: data only (docs/format.md, "The INT8 model file").

``payload`` is what ``formats.save_model`` writes beside the architecture's .cpz bytes: the table
(``compress_int8``: backend, observer, input shape, calibration, the layers kept float, the hand-written
activations run as torch's, the model's metadata as JSON text, the state's index) and the INT8 state packed
into one flat tensor per dtype (``int8_state``). ``rebuild`` makes the INT8 model again from the architecture
with compress's own code and loads the state into it only once every index row, name, shape and dtype has
been checked against what it rebuilt. Version 1 (one tensor per entry) is still read.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch
import torch.nn as nn

from compress import kinds
from compress.budget import call_limits, cost_factor
from compress.counting import sample_cost, sample_ops
from compress.cpz.stats import size_bytes
from compress.errors import InputError, first_line, printable, safe
from compress.meta import META_ATTR, get_meta
from compress.method import check_shape
from compress.quantize import pt2e
from compress.quantize.int8 import BACKENDS, OBSERVERS, Int8Model, _quiet, _require_fx, native_activations, prepare
from compress.torch_files import save_torch, save_wrapped, wrapped_size

INT8_KEY = "compress_int8"  # the table in an INT8 file: {"version", "backend", "observer", "input_shape", ...}
FILE_VERSION = 2  # 2: the state packed into one buffer per dtype + an index (1: one tensor per entry; still read)
PT2E_VERSION = 3  # the PT2E engine's: the converted graph's constants packed as in 2, and every activation's qparams
QAT_OBSERVER = "moving average (QAT)"  # the observer a QAT model's table names


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
        _check_qparams(key, scales, zps, ints.dtype)
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


def _check_qparams(key: str, scales: torch.Tensor, zps: torch.Tensor, dtype: torch.dtype) -> None:
    """Scales finite and > 0 (a NaN or 0 scale makes every value it reaches NaN or infinite), zero points
    integers within the range of the integers they offset."""
    if not scales.is_floating_point() or zps.is_floating_point() or zps.dtype == torch.bool:
        raise InputError(f"INT8 file: {safe(key)} has scales or zero points of the wrong type")
    if not pt2e.scales_ok(scales):
        raise InputError(f"INT8 file: {safe(key)} has a scale that is not a finite positive number")
    info = torch.iinfo(dtype)
    if zps.numel() and not (info.min <= int(zps.min()) and int(zps.max()) <= info.max):
        raise InputError(f"INT8 file: {safe(key)} has a zero point outside the range of {str(dtype)[6:]}")


MAX_TEXT = 2000  # characters of one string of the table (a calibration's description, a layer's name)


def _text(v: Any) -> Any:
    """A string of the table as the file has it, fit to print: control characters escaped (no escape
    sequence from a file reaches a terminal or a report), at most MAX_TEXT characters; in a list, its strings
    (one level: the table's lists are flat, and their items' types are checked where they are read)."""
    if isinstance(v, str):
        if len(v) > MAX_TEXT:
            raise InputError(f"INT8 file: a string of its table is longer than {MAX_TEXT} characters")
        return printable(v)
    if isinstance(v, list):
        return [_text(x) if isinstance(x, str) else x for x in v]
    return v


def payload(model: Int8Model) -> dict[str, Any]:
    """What an INT8 file holds besides the float model: the table and the INT8 state as plain tensors (PT2E:
    the converted graph's constants, and each activation's scale and zero point by its quantize node)."""
    # the model's metadata (its history since the conversion too) as JSON text: the table holds plain values only
    meta = json.dumps(get_meta(model), default=str)
    if model.engine == "pt2e":
        flat = {k: v.detach() for k, v in pt2e.constants(model.inner).items()}  # type: ignore[arg-type]
        qparams = [[k, *v] for k, v in pt2e.activation_qparams(model.inner).items()]  # type: ignore[arg-type]
        buffers, index = _pack(flat)
        table = {**model.compress_int8, "version": PT2E_VERSION, "meta": meta, "index": index, "qparams": qparams}
        return {INT8_KEY: table, "int8_state": buffers}
    flat = {}
    with _quiet():
        for k, v in model.inner.state_dict().items():
            _flat(k, v, flat)
    buffers, index = _pack(flat)
    return {
        INT8_KEY: {**model.compress_int8, "version": FILE_VERSION, "meta": meta, "index": index},
        "int8_state": buffers,
    }


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
    if not (
        isinstance(buffers, dict)
        and set(buffers) <= set(PACKED)
        and all(
            isinstance(b, torch.Tensor)
            and b.layout == torch.strided  # (a sparse tensor is no buffer to slice)
            and b.is_contiguous()  # (as torch.save writes a buffer: a stride of 0 claims any length)
            and b.dim() == 1
            and b.dtype == PACKED[dt]
            for dt, b in buffers.items()
        )
    ):
        raise InputError("INT8 file: its INT8 state is not buffers of the dtypes this compress writes")
    if not isinstance(index, list) or len(index) > 1_000_000:
        raise InputError("INT8 file: its state index is not a list")
    out: dict[str, torch.Tensor] = {}
    for row in index:
        if not (
            isinstance(row, list)
            and len(row) == 4
            and isinstance(row[0], str)
            and isinstance(row[1], str)
            and row[1] in buffers
            and isinstance(row[2], list)
            and len(row[2]) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in row[2])
            and isinstance(row[3], int)
            and not isinstance(row[3], bool)
            and row[3] >= 0
        ):
            raise InputError("INT8 file: a row of its state index is damaged")
        name, dt, shape, off = row
        n = 1
        for d in shape:
            n *= d
        if off + n > len(buffers[dt]) or name in out:
            raise InputError(f"INT8 file: {name} lies outside its buffer or is listed twice")
        out[name] = buffers[dt][off : off + n].view(shape)
    return out


def file_size(model: Int8Model) -> int:
    """The bytes of the file ``model_io.save_model`` writes for ``model``."""
    return wrapped_size(model.arch_cpz, payload(model))


@size_bytes.register(Int8Model)
def _size_bytes(model: Int8Model, graph: bool = False, coder: str = "auto") -> dict[str, Any]:
    n = file_size(model)  # not a .cpz: its file's bytes, both coded and fixed
    return {"coded": n, "fixed": n, "layers": {}, "graph_note": None}


@save_torch.register(Int8Model)
def _save(model: Int8Model, path, force: bool = False):
    # generated code is never pickled: the architecture as a .cpz, the INT8 state as plain tensors
    return save_wrapped(model.arch_cpz, path, force=force, extra=payload(model))


TABLE = {  # every key an INT8 file's table may hold, and the exact type of its value (files of every version)
    "version": int,
    "engine": str,
    "backend": str,
    "observer": str,
    "input_shape": list,
    "calibration": str,
    "keep_float": list,
    "native_activations": list,
    "reduce_range": int,
    "observer_errors": list,
    "engine_note": str,
    "qat": str,
    "budget": str,
    "float_fallback": list,
    "meta": str,
    "index": list,
    "qparams": list,
}


def rebuild(float_model: nn.Module, table: Any, state: Any, arch_cpz: bytes | None = None) -> Int8Model:
    """The INT8 model a file describes, from its float architecture (decoded from ``arch_cpz``, the file's bytes
    of it): prepared and converted by compress, then the file's INT8 state (checked: the same names and shapes)
    loaded into it."""
    if not (
        isinstance(table, dict)
        and all(k in TABLE and type(v) is TABLE[k] for k, v in table.items())  # (bool is no int here)
        and table.get("version") in (1, FILE_VERSION, PT2E_VERSION)
        and table.get("engine", "fx") == ("pt2e" if table.get("version") == PT2E_VERSION else "fx")
        and ("qparams" in table) == (table.get("version") == PT2E_VERSION)
        and table.get("backend") in BACKENDS
        and table.get("observer") in (*OBSERVERS, *pt2e.OBSERVERS, QAT_OBSERVER)
        and table.get("reduce_range", 0) in (0, 1)
        and _errors_ok(table.get("observer_errors", []))
        and isinstance(table.get("budget", ""), str)
    ):
        raise InputError("INT8 file: its table is not one this compress writes")
    table = dict(table)
    engine = table.get("engine", "fx")
    if engine == "fx":
        _require_fx()
    elif pt2e.unavailable_library() is not None:
        raise InputError(f"INT8 file: it runs on torchao's PT2E engine, and {pt2e.unavailable_library()}")
    meta = _meta(table.pop("meta", "{}"))
    qparams = _qparams(table.pop("qparams", None)) if engine == "pt2e" else None
    if table["version"] in (FILE_VERSION, PT2E_VERSION):
        state = _unpack(state, table.pop("index", None))
    table = {
        k: _text(v) if k not in ("keep_float", "native_activations", "observer_errors", "float_fallback") else v
        for k, v in table.items()
    }
    refused = kinds.refusal(float_model, kinds.INT8)  # a float architecture stored as a graph only
    if refused is not None:
        raise refused
    shape = table.get("input_shape")
    if not (
        isinstance(shape, list)
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 1 << 16 for s in shape)
    ):
        raise InputError("INT8 file: bad input shape")
    check_shape(shape, "INT8 file: its input shape")  # the shape budget every input shape goes through
    shape = [1, *shape[1:]]
    table["input_shape"] = shape
    _check_rebuild_size(float_model, shape)
    try:  # on the meta device, before anything runs at that shape
        sample_bytes, sample_work = sample_cost(float_model, shape)
    except InputError as e:
        raise InputError(f"INT8 file: {e}") from None
    max_work, max_bytes = call_limits()
    if 2 * sample_bytes > max_bytes or 2 * sample_work > max_work:  # (a QAT rebuild runs two samples)
        raise InputError(
            f"INT8 file: its input shape {shape} asks for {sample_work:.3g} operations and "
            f"{sample_bytes / 2**20:,.0f} MiB of activations for one sample, more than any call may "
            f"({max_work:.3g}, {max_bytes / 2**20:,.0f} MiB; COMPRESS_MAX_GRAPH_COST raises both)"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("INT8 file: its INT8 state is not a table of tensors")
    kept, native = table.get("keep_float", []), table.get("native_activations")
    for names in (kept, [] if native is None else native):
        if not (
            isinstance(names, list) and len(names) <= 10_000 and all(isinstance(n, str) and len(n) < 512 for n in names)
        ):
            raise InputError("INT8 file: its float layers or activations are not a list of layer names")
    known = {n for n, _ in float_model.named_modules()}
    if not set(kept) <= known:
        raise InputError("INT8 file: it keeps float a layer its architecture does not have")
    if not _fallback_ok(table.get("float_fallback", []), kept):
        raise InputError("INT8 file: its float fallback is not rows of a layer it keeps float and four numbers")
    try:
        if engine == "pt2e":
            return _rebuilt_pt2e(float_model, table, state, qparams, arch_cpz, meta, shape, kept, native, sample_bytes)
        return _rebuilt(float_model, table, state, arch_cpz, meta, shape, kept, native, sample_bytes)
    except InputError:
        raise
    except Exception as e:  # a trace or conversion torch refuses on this architecture: one line, as any bad file
        raise InputError(
            f"INT8 file: its model cannot be rebuilt from its architecture ({type(e).__name__}: "
            f"{safe(first_line(e, 100))})"
        ) from None


# operations (aten calls) of one sample of the float architecture that an INT8 file may ask compress to export,
# prepare and convert again: ResNet-56 runs 258 and rebuilds in 17 s; a chain of 1,000 tiny layers (a 33 KB
# architecture) took 65 s, more for each layer than the one before
MAX_REBUILD_OPS = 1024


def _check_rebuild_size(float_model: nn.Module, shape: list[int]) -> None:
    """Refuse an architecture that rebuilding would take minutes for, before it runs or is copied: more than
    MAX_REBUILD_OPS operations a sample (stopped counting there), or more than 4 modules for each (copying 45,000
    modules and counting their costs on the meta device took 140 s)."""
    limit = int(cost_factor() * MAX_REBUILD_OPS)
    modules = sum(1 for _ in float_model.modules())
    try:
        ops = sample_ops(float_model, shape, limit) if modules <= 4 * limit else limit + 1
    except InputError as e:
        raise InputError(f"INT8 file: {e}") from None
    if ops > limit:
        raise InputError(
            f"INT8 file: its architecture ({modules:,} modules) is larger than an INT8 rebuild may be: more than "
            f"{limit:,} operations a sample or {4 * limit:,} modules, each of which takes tens of milliseconds to "
            "export, prepare and convert (COMPRESS_MAX_GRAPH_COST raises both)"
        )


def _finite(v: Any) -> bool:
    """A finite float, or an int a float holds exactly (10**400 is no number a table holds; bool is no int)."""
    return type(v) is float and math.isfinite(v) or type(v) is int and abs(v) < 1 << 53


def _errors_ok(rows: Any) -> bool:
    """An auto observer's table of candidates: at most a few ``[name, finite number >= 0]`` rows."""
    return (
        isinstance(rows, list)
        and len(rows) <= 16
        and all(
            isinstance(r, list)
            and len(r) == 2
            and r[0] in (*OBSERVERS, *pt2e.OBSERVERS)
            and _finite(r[1])
            and r[1] >= 0
            for r in rows
        )
    )


def _fallback_ok(rows: Any, kept: list) -> bool:
    """The layers an accuracy budget kept float (``int8_fallback``): at most ``MAX_FALLBACK`` rows ``[layer,
    output error all INT8, output error with it float, score before, score after]``, each layer one the file keeps
    float, named once; errors finite and >= 0, scores finite."""
    return (
        isinstance(rows, list)
        and len(rows) <= MAX_FALLBACK
        and all(
            isinstance(r, list)
            and len(r) == 5
            and isinstance(r[0], str)
            and r[0] in kept
            and all(_finite(v) for v in r[1:])
            and r[1] >= 0
            and r[2] >= 0
            for r in rows
        )
        and len({r[0] for r in rows}) == len(rows)
    )


MAX_FALLBACK = 100  # rows of a float fallback: Int8Config.max_float_layers at most
MAX_QPARAMS = 1_000_000


def _qparams(rows: Any) -> dict[str, list]:
    """A PT2E file's activation qparams, ``[[node name, scale, zero point, quant min, quant max], ...]``: every
    row's types and ranges checked here, its names and grid against the rebuilt graph (``pt2e.load_numbers``)."""
    if not isinstance(rows, list) or len(rows) > MAX_QPARAMS:
        raise InputError("INT8 file: its activation ranges are not a list")
    out: dict[str, list] = {}
    for row in rows:
        if not (
            isinstance(row, list)
            and len(row) == 5
            and isinstance(row[0], str)
            and len(row[0]) < 512
            and isinstance(row[1], float)
            and pt2e.scale_ok(row[1])
            and all(isinstance(v, int) and not isinstance(v, bool) and -(1 << 31) <= v < 1 << 31 for v in row[2:])
            and row[0] not in out
        ):
            raise InputError("INT8 file: a row of its activation ranges is damaged")
        out[row[0]] = row[1:]
    return out


def _rebuilt_pt2e(float_model, table, state, qparams, arch_cpz, meta, shape, kept, native, sample_bytes) -> Int8Model:
    """The PT2E model: the float architecture exported, prepared and converted again (uncalibrated), then
    every constant and activation range the file holds put back, each checked against what was rebuilt."""
    work = copy.deepcopy(float_model).cpu().eval()
    swapped = native_activations(work)
    if sorted(swapped) != sorted(native or []):
        raise InputError("INT8 file: its activations do not match its float model")
    qat = "qat" in table  # QAT converts another graph (batch norm folded at conversion): made the same way
    if qat:  # the skeleton's zeroed batch norms would divide zero by zero in QAT's conv-bn fusion
        with torch.no_grad():
            for mod in work.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    if mod.weight is not None:
                        mod.weight.fill_(1.0)
                    if mod.running_var is not None:
                        mod.running_var.fill_(1.0)
    reduce = bool(table.get("reduce_range", 0))
    with pt2e.quiet():
        prepared = pt2e.prepare(work, shape, "minmax", tuple(kept), qat=qat, reduce_range=reduce)
        with torch.no_grad():  # zeros (their cost checked above): the weight observers see their shapes
            if qat:  # two samples: batch norm in training mode needs more than one value per channel
                pt2e.train_mode(prepared, True)
                prepared(torch.zeros([2, *shape[1:]]))
                pt2e.train_mode(prepared, False)
            else:
                prepared(torch.zeros(shape))
        graph = pt2e.convert(prepared)
    pt2e.load_numbers(graph, state, qparams)
    model = Int8Model(graph, table, float_model.eval(), arch_cpz).eval()
    model.sample_bytes = sample_bytes
    setattr(model, META_ATTR, {**get_meta(model), **meta, "input_shape": list(shape)})
    return model


def _rebuilt(float_model, table, state, arch_cpz, meta, shape, kept, native, sample_bytes) -> Int8Model:
    from torch.ao.quantization.quantize_fx import convert_fx

    observer = table["observer"] if table["observer"] in OBSERVERS else "histogram"  # (QAT: moving averages)
    with _quiet():
        prepared = prepare(float_model, shape, observer, tuple(kept), table["backend"], native=native is not None)
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
    model.sample_bytes = sample_bytes
    # the file's metadata, but the input shape is the table's: the one checked above (the metadata's is not)
    setattr(model, META_ATTR, {**get_meta(model), **meta, "input_shape": list(shape)})
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
    if not isinstance(meta, dict) or _nested_deeper(meta, MAX_META_DEPTH):
        raise InputError(f"INT8 file: its metadata is not a table nested at most {MAX_META_DEPTH} deep")
    return meta


MAX_META_DEPTH = 32  # compress's own metadata nests 5 deep; 600 parses, and copying it then recurses too deep


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether lists and tables nest more than ``limit`` deep in ``value`` (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth >= limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False
