"""The .cpz container: one compact, checked file holding a compressed model.

Layout (all integers little-endian; see docs/format.md)::

    0   4  magic  b"CPZ\\0"
    4   2  version (1)
    6   2  flags (0)
    8   4  manifest length M (bytes, zlib-compressed JSON)
    12  4  CRC-32 of the manifest bytes
    16  M  manifest: {"arch": ..., "tensors": [...], "meta": ...}
    ..     tensor sections, in manifest order, each with its CRC-32 in the manifest
    -4  4  CRC-32 of every byte before it

Reading never trusts a declared length: sizes are checked against the file size and fixed limits
before anything is allocated, every CRC is verified before decoding, and the architecture is data
(``arch.py``), so decoding a stranger's file runs none of its code.
"""
from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import FormatError, InputError
from ..fileio import atomic_write
from ..masks import remove_masks
from ..quant_state import PARAMS, QuantState, get_state, set_state
from . import arch as arch_mod
from . import streams

log = logging.getLogger(__name__)
MAGIC = b"CPZ\x00"
VERSION = 1
HEAD = struct.Struct("<4sHHII")
MAX_MANIFEST = 64 << 20
MAX_NUMEL = 1 << 31
MAX_TENSORS = 20_000
# Decoding is bounded by what the file can honestly hold: at most MAX_RATIO times its size in
# decoded bytes (the densest legitimate coding, a very sparse layer's gap stream, stays far below),
# with a floor for small files. COMPRESS_MAX_DECODE_RATIO overrides it for a file you trust.
MAX_RATIO = 1000
MIN_DECODED_BYTES = 64 << 20
_RAW_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
               "int32": np.int32, "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


# ----------------------------------------------------------------------------- encoding
def _raw(t: torch.Tensor) -> tuple[bytes, dict]:
    a = t.detach().cpu().contiguous().numpy()
    return a.astype(a.dtype.newbyteorder("<")).tobytes(), {"enc": "raw"}


def _has_negative_zero(t: torch.Tensor) -> bool:
    return bool(((t == 0) & torch.signbit(t)).any())


def _coded(sym: np.ndarray, zero: np.ndarray, alpha: int, params: bytes,
           fields: dict) -> tuple[bytes, dict]:
    """Dense (all symbols) or sparse (index + nonzero symbols), the smaller."""
    dense, df = streams.encode_symbols(sym, alpha)
    best = (params + dense, {**fields, "mode": "dense", "params_bytes": len(params), "values": df})
    nz = ~zero
    if zero.any():
        idx, ifl = streams.encode_index(nz)
        vals, vf = streams.encode_symbols(sym[nz], alpha)
        if len(idx) + len(vals) < len(dense):
            best = (params + idx + vals, {**fields, "mode": "sparse", "params_bytes": len(params),
                                          "index_bytes": len(idx), "index": ifl, "values": vf})
    return best


def _encode_state(state: QuantState, t: torch.Tensor) -> tuple[bytes, dict]:
    """A quantized weight: its codes as they are, with the grid's scales or the codebook in front."""
    zero = (t.detach().flatten() == 0).cpu().numpy()
    bits = int(state.bits)
    if state.is_codebook:
        cb = state.codebook.float().cpu().numpy().astype("<f4")
        k = len(cb)
        sym = state.codes.flatten().cpu().numpy().astype(np.int64)
        sym[sym < 0] = k  # explicit zero symbol for dense mode
        half = bool(np.array_equal(cb.astype("<f2").astype("<f4"), cb))  # k-means rounds its centroids so
        fields = {"enc": "codebook", "bits": bits, "k": k, **({"cb16": True} if half else {})}
        return _coded(sym, zero, k + 1, (cb.astype("<f2") if half else cb).tobytes(), fields)
    scale = state.scale.float().cpu().numpy().astype("<f4")
    params = scale.tobytes()
    affine = not state.symmetric
    if affine:
        params += state.zero_point.float().cpu().numpy().astype("<f4").tobytes()
    sym = state.codes.cpu().numpy().reshape(-1).astype(np.int64)
    return _coded(sym, zero, 2 ** bits, params,
                  {"enc": "uniform", "bits": bits, "channels": len(scale), "affine": affine,
                   "per_channel": bool(state.per_channel)})


def encode_tensor(t: torch.Tensor, state: QuantState | None = None, where: str = "") -> tuple[bytes, dict]:
    if state is not None:
        try:
            state.check(t, where)
        except ValueError as e:
            raise InputError(str(e)) from e
        return _encode_state(state, t)
    if t.dtype == torch.float32 and t.numel() > 64 and not _has_negative_zero(t):
        flat = t.detach().flatten().cpu()
        zero = (flat == 0).numpy()
        if zero.mean() > 0.5:  # pruned but not quantized: positions + fp32 nonzero values
            idx, ifl = streams.encode_index(~zero)
            vals = flat.numpy()[~zero].astype("<f4").tobytes()
            return idx + vals, {"enc": "sparse_raw", "index": ifl, "index_bytes": len(idx)}
    return _raw(t)


def encode_model(model: nn.Module) -> tuple[bytes, dict]:
    """The .cpz bytes of a model, and per-tensor stats."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("TorchScript models cannot be stored in a .cpz; pass the nn.Module")
    remove_masks(model)
    try:
        spec = arch_mod.describe(model)
    except TypeError as e:
        raise InputError(str(e)) from e
    modules = dict(model.named_modules())
    entries, sections, offset = [], [], 0
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        mod_name, _, leaf = name.rpartition(".")
        state = get_state(modules[mod_name], leaf) if leaf in PARAMS and mod_name in modules else None
        data, fields = encode_tensor(t, state, name)
        entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                 "length": len(data), "crc": zlib.crc32(data), **fields}  # sections follow each other
        entries.append(entry)
        sections.append(data)
        offset += len(data)
    manifest = {"arch": spec, "tensors": entries, "format": "cpz", "version": VERSION}
    try:
        mbytes = zlib.compress(json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode(), 9)
    except ValueError as e:
        raise InputError(f"model metadata cannot be stored: {e}") from e
    body = HEAD.pack(MAGIC, VERSION, 0, len(mbytes), zlib.crc32(mbytes)) + mbytes + b"".join(sections)
    blob = body + struct.pack("<I", zlib.crc32(body))
    stats = {"file_bytes": len(blob), "manifest_bytes": len(mbytes), "tensors": entries}
    return blob, stats


def save_cpz(model: nn.Module, path, force: bool = False) -> dict:
    """Write ``model`` as a .cpz file atomically; returns per-tensor stats."""
    blob, stats = encode_model(model)
    with atomic_write(path, force) as tmp:
        Path(tmp).write_bytes(blob)
    return stats


# ----------------------------------------------------------------------------- decoding
def _fail(path, msg):
    raise FormatError(f"{path}: not a valid .cpz file ({msg})")


def read_manifest(blob: bytes, path="<bytes>") -> tuple[dict, int]:
    if len(blob) < HEAD.size + 4:
        _fail(path, "too short")
    magic, version, flags, mlen, mcrc = HEAD.unpack_from(blob, 0)
    if magic != MAGIC:
        _fail(path, "bad magic")
    if version != VERSION:
        _fail(path, f"unsupported version {version}; this compress reads version {VERSION}")
    if flags != 0:
        _fail(path, "unknown flags")
    if mlen > len(blob) - HEAD.size - 4 or mlen > MAX_MANIFEST:
        _fail(path, "manifest length beyond the file")
    (fcrc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    if zlib.crc32(memoryview(blob)[:-4]) != fcrc:
        _fail(path, "file checksum mismatch: truncated or corrupted")
    mbytes = blob[HEAD.size:HEAD.size + mlen]
    if zlib.crc32(mbytes) != mcrc:
        _fail(path, "manifest checksum mismatch")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(mbytes, MAX_MANIFEST)
        if d.unconsumed_tail:
            _fail(path, "manifest too large")
        manifest = json.loads(raw)
    except (zlib.error, ValueError, UnicodeDecodeError, RecursionError):
        _fail(path, "unreadable manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list) or "arch" not in manifest:
        _fail(path, "malformed manifest")
    if len(manifest["tensors"]) > MAX_TENSORS:
        _fail(path, "too many tensors")
    return manifest, HEAD.size + mlen


def _shape_numel(e: dict) -> tuple[list, int]:
    shape = e.get("shape")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < MAX_NUMEL for s in shape)):
        raise ValueError("bad shape")
    n = 1
    for s in shape:
        n *= s
        if n > MAX_NUMEL:
            raise ValueError("tensor too large")
    return shape, n


def _decode_raw(e: dict, data: bytes, shape: list, n: int) -> torch.Tensor:
    dtype = e.get("dtype")
    if dtype not in _RAW_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    npd = np.dtype(_RAW_DTYPES[dtype]).newbyteorder("<")
    if len(data) != n * npd.itemsize:
        raise ValueError("raw tensor has the wrong length")
    a = np.frombuffer(data, dtype=npd).astype(npd.newbyteorder("="))
    return torch.from_numpy(a.copy()).reshape(shape)


def _decode_sparse_raw(e: dict, data: bytes, shape: list, n: int, budget) -> torch.Tensor:
    ib = streams._int(e, "index_bytes", 0, len(data))
    mask = streams.decode_index(data[:ib], _dict(e, "index"), n, budget)
    vals = data[ib:]
    if len(vals) != 4 * int(mask.sum()):
        raise ValueError("sparse values have the wrong length")
    out = np.zeros(n, dtype=np.float32)
    out[mask] = np.frombuffer(vals, dtype="<f4")
    return torch.from_numpy(out).reshape(shape)


def _dict(e: dict, key: str) -> dict:
    v = e.get(key)
    if not isinstance(v, dict):
        raise ValueError(f"{key!r} must be a table")
    return v


def _symbols(e: dict, rest: bytes, n: int, alpha: int, budget) -> tuple[np.ndarray, np.ndarray | None]:
    """The coded symbols of a quantized tensor: all n (dense), or the nonzeros and their mask."""
    if _dict(e, "values").get("alpha") != alpha:
        raise ValueError("alphabet does not match the encoding")
    mode = e.get("mode")
    if mode == "dense":
        sym, mask = streams.decode_symbols(rest, _dict(e, "values"), n, budget), None
        expected = n
    elif mode == "sparse":
        ib = streams._int(e, "index_bytes", 0, len(rest))
        mask = streams.decode_index(rest[:ib], _dict(e, "index"), n, budget)
        expected = int(mask.sum())
        sym = streams.decode_symbols(rest[ib:], _dict(e, "values"), expected, budget)
    else:
        raise ValueError("unknown mode")
    if len(sym) != expected:
        raise ValueError("wrong symbol count")
    return sym, mask


def _decode_state(e: dict, data: bytes, shape: list, n: int, budget) -> QuantState:
    """The quantization state of a coded weight: its codes exactly as they were written."""
    enc = e.get("enc")
    if e.get("dtype") != "float32":
        raise ValueError("coded tensors are float32")
    bits = streams._int(e, "bits", 2, 8)
    pb = streams._int(e, "params_bytes", 0, len(data))
    params, rest = data[:pb], data[pb:]
    if enc == "codebook":
        k = streams._int(e, "k", 1, 256)
        half = e.get("cb16", False)
        if not isinstance(half, bool) or pb != (2 if half else 4) * k:
            raise ValueError("codebook has the wrong size")
        sym, mask = _symbols(e, rest, n, k + 1, budget)  # symbols < k + 1: the streams check the alphabet
        if mask is None:
            codes = sym.astype(np.int16)
            codes[codes == k] = -1  # the dense stream's zero symbol
        else:
            codes = np.full(n, -1, dtype=np.int16)
            codes[mask] = sym
            if n and codes.max() >= k:
                raise ValueError("code outside the codebook")
        cb = torch.from_numpy(np.frombuffer(params, dtype="<f2" if half else "<f4").astype(np.float32))
        return QuantState(bits, "kmeans", torch.from_numpy(codes), codebook=cb)
    c = streams._int(e, "channels", 1, n if n else 1)
    affine = e.get("affine")
    if not isinstance(affine, bool) or pb != 4 * c * (2 if affine else 1) or (n and n % c):
        raise ValueError("scales have the wrong size")
    sym, mask = _symbols(e, rest, n, 2 ** bits, budget)
    scale = torch.from_numpy(np.frombuffer(params[:4 * c], dtype="<f4").astype(np.float32))
    zp = torch.from_numpy(np.frombuffer(params[4 * c:], dtype="<f4").astype(np.float32)) if affine else None
    if mask is None:
        codes = sym.astype(np.int64)
    else:  # pruned weights are the grid's zero: code -lo (symmetric) or the channel's zero point
        lo = -(2 ** (bits - 1) - 1) if not affine else 0
        codes = np.repeat(zp.numpy().astype(np.int64), n // c) if affine else np.full(n, -lo, dtype=np.int64)
        codes[mask] = sym
    state = QuantState(bits, "uniform", torch.from_numpy(codes.astype(np.uint8)).view(c, -1), scale, zp,
                       per_channel=bool(e.get("per_channel", True)))
    return state


def _decode_entry(e: dict, data: bytes, budget) -> tuple[torch.Tensor, QuantState | None]:
    """One tensor section -> (tensor, its quantization state or None)."""
    shape, n = _shape_numel(e)
    budget.spend(elements=n, work=1024 + n)  # the output tensor, and the per-entry overhead
    enc = e.get("enc")
    if enc == "raw":
        return _decode_raw(e, data, shape, n), None
    if e.get("dtype") != "float32":
        raise ValueError("coded tensors are float32")
    if enc == "sparse_raw":
        return _decode_sparse_raw(e, data, shape, n, budget), None
    if enc not in ("uniform", "codebook"):
        raise ValueError(f"unknown encoding {enc!r}")
    state = _decode_state(e, data, shape, n, budget)
    return state.dequantize(shape), state


def decode_budget(file_bytes: int, max_ratio: float | None = None) -> streams.Budget:
    """What decoding a file of ``file_bytes`` may spend (see MAX_RATIO)."""
    import os

    ratio = max_ratio if max_ratio is not None else float(os.environ.get("COMPRESS_MAX_DECODE_RATIO", MAX_RATIO))
    decoded_bytes = max(MIN_DECODED_BYTES, int(ratio * file_bytes))
    # work: 128 units (~1.3 us) per byte of file, at least 2^26 (~0.7 s); real files need far less
    return streams.Budget(elements=decoded_bytes // 4, work=max(1 << 26, int(ratio / MAX_RATIO * 128 * file_bytes)))


def _arch_hint(spec) -> str:
    meta = spec.get("attrs", {}).get("compress_meta") if isinstance(spec, dict) else None
    ref = meta.get("d", {}).get("arch_ref") if isinstance(meta, dict) else None
    return f"--arch {ref}" if isinstance(ref, str) else "--arch module:callable (the code that builds it)"


def decode_model(blob: bytes, path="<bytes>", budget: streams.Budget | None = None,
                 base: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Decode .cpz bytes. ``base`` builds the user's own model (their ``--arch``) when the
    architecture refers to classes of their code; it is called only then."""
    manifest, start = read_manifest(blob, path)
    budget = budget or decode_budget(len(blob))
    end = len(blob) - 4
    tensors, states = {}, {}
    expected_off = 0
    for e in manifest["tensors"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            _fail(path, "malformed tensor entry")
        if e["name"] in tensors:
            _fail(path, f"tensor {e['name']} appears twice")
        off, ln, crc = e.get("offset", expected_off), e.get("length"), e.get("crc")  # offset: older writers
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, ln, crc)) \
                or start + off + ln > end:
            _fail(path, f"section of {e['name']} lies outside the file")
        if off != expected_off:  # sections follow each other: none overlaps or is read twice
            _fail(path, f"section of {e['name']} does not follow the previous one (overlapping sections)")
        expected_off = off + ln
        data = blob[start + off:start + off + ln]
        if zlib.crc32(data) != crc:
            _fail(path, f"checksum mismatch in {e['name']}")
        try:
            tensors[e["name"]], state = _decode_entry(e, data, budget)
        except streams.BudgetExceeded as err:
            raise FormatError(f"{path}: refused: {err} (more than {MAX_RATIO}x its {len(blob):,} bytes). If you "
                              "trust it, set COMPRESS_MAX_DECODE_RATIO to a larger ratio") from None
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as err:
            _fail(path, f"tensor {e['name']}: {err}")
        if state is not None:
            states[e["name"]] = state
    if start + expected_off != end:
        _fail(path, "bytes between the last section and the checksum")
    spec = manifest["arch"]
    refs = arch_mod.references(spec)
    if refs and base is None:
        raise InputError(f"{path}: {arch_mod.NeedsArch(refs)}; pass {_arch_hint(spec)} to rebuild it "
                         "(the file stores its structure and weights as data, not the code)")
    try:
        model = arch_mod.rebuild(spec, tensors, base=base() if refs else None)
    except arch_mod.ArchMismatch as err:
        raise InputError(f"{path}: {err}; pass the --arch the file was written with ({_arch_hint(spec)})") from None
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        _fail(path, f"architecture: {err}")
    mods = dict(model.named_modules())
    for name, state in states.items():
        mod_name, _, leaf = name.rpartition(".")
        if leaf not in PARAMS or mod_name not in mods:
            _fail(path, f"coded tensor {name} is not the weight or bias of a layer in the architecture")
        set_state(mods[mod_name], state, leaf)
    model.eval()
    return model


def load_cpz(path, base: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Decode a .cpz file into a runnable module (no code from the file runs; ``base``: see
    ``decode_model``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size > 16 << 30:
        _fail(path, "file too large")
    return decode_model(path.read_bytes(), path, base=base)
