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
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import FormatError, InputError
from ..io import atomic_write
from ..masks import remove_masks
from ..quantize import QUANT_ATTR, codes_of
from ..quantize.uniform import qrange
from . import arch as arch_mod
from . import streams

log = logging.getLogger(__name__)
MAGIC = b"CPZ\x00"
VERSION = 1
HEAD = struct.Struct("<4sHHII")
MAX_MANIFEST = 64 << 20
MAX_NUMEL = 1 << 31
MAX_TENSORS = 100_000
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


def encode_tensor(t: torch.Tensor, module: nn.Module | None, is_weight: bool) -> tuple[bytes, dict]:
    info = getattr(module, QUANT_ATTR, None) if (module is not None and is_weight) else None
    if info is not None and t.dtype == torch.float32 and not _has_negative_zero(t):
        codes, info = codes_of(module)
        flat_w = t.detach().flatten()
        zero = (flat_w == 0).numpy()
        bits = int(info["bits"])
        if "codebook" in info:
            cb = info["codebook"].float().numpy().astype("<f4")
            k = len(cb)
            sym = codes.numpy().astype(np.int64)
            sym[sym < 0] = k  # explicit zero symbol for dense mode
            return _coded(sym, zero, k + 1, cb.tobytes(),
                          {"enc": "codebook", "bits": bits, "k": k})
        scale = info["scale"].float().numpy().astype("<f4")
        params = scale.tobytes()
        sym_affine = not info.get("symmetric", True)
        if sym_affine:
            params += info["zero_point"].float().numpy().astype("<f4").tobytes()
        sym = codes.numpy().reshape(-1).astype(np.int64)
        return _coded(sym, zero, 2 ** bits, params,
                      {"enc": "uniform", "bits": bits, "channels": len(scale), "affine": sym_affine,
                       "per_channel": bool(info.get("per_channel", True))})
    if t.dtype == torch.float32 and t.numel() > 64 and not _has_negative_zero(t):
        zero = (t.detach().flatten() == 0).numpy()
        if zero.mean() > 0.5:  # pruned but not quantized: positions + fp32 nonzero values
            idx, ifl = streams.encode_index(~zero)
            vals = t.detach().flatten().numpy()[~zero].astype("<f4").tobytes()
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
        data, fields = encode_tensor(t, modules.get(mod_name), leaf == "weight")
        entry = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                 "offset": offset, "length": len(data), "crc": zlib.crc32(data), **fields}
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


def _decode_tensor(e: dict, data: bytes) -> torch.Tensor:
    shape = e.get("shape")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(isinstance(s, int) and 0 <= s < MAX_NUMEL for s in shape)):
        raise ValueError("bad shape")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n > MAX_NUMEL:
        raise ValueError("tensor too large")
    enc, dtype = e.get("enc"), e.get("dtype")
    if enc == "raw":
        if dtype not in _RAW_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        npd = np.dtype(_RAW_DTYPES[dtype]).newbyteorder("<")
        if len(data) != n * npd.itemsize:
            raise ValueError("raw tensor has the wrong length")
        a = np.frombuffer(data, dtype=npd).astype(npd.newbyteorder("="))
        return torch.from_numpy(a.copy()).reshape(shape)
    if dtype != "float32":
        raise ValueError("coded tensors are float32")
    if enc == "sparse_raw":
        ib = streams._int(e, "index_bytes", 0, len(data))
        mask = streams.decode_index(data[:ib], e.get("index") or {}, n)
        vals = data[ib:]
        if len(vals) != 4 * int(mask.sum()):
            raise ValueError("sparse values have the wrong length")
        out = np.zeros(n, dtype=np.float32)
        out[mask] = np.frombuffer(vals, dtype="<f4")
        return torch.from_numpy(out).reshape(shape)
    if enc not in ("uniform", "codebook"):
        raise ValueError(f"unknown encoding {enc!r}")
    bits = streams._int(e, "bits", 2, 8)
    pb = streams._int(e, "params_bytes", 0, len(data))
    params, rest = data[:pb], data[pb:]
    if enc == "codebook":
        k = streams._int(e, "k", 1, 256)
        if pb != 4 * k:
            raise ValueError("codebook has the wrong size")
        table = np.concatenate([np.frombuffer(params, dtype="<f4"), np.zeros(1, np.float32)]).astype(np.float32)
        alpha = k + 1
    else:
        c = streams._int(e, "channels", 1, n if n else 1)
        affine = e.get("affine")
        if not isinstance(affine, bool) or pb != 4 * c * (2 if affine else 1) or (n and n % c):
            raise ValueError("scales have the wrong size")
        alpha = 2 ** bits
    if e.get("mode") == "dense":
        sym = streams.decode_symbols(rest, e.get("values") or {}, n)
        if len(sym) != n:
            raise ValueError("wrong symbol count")
        mask = None
    elif e.get("mode") == "sparse":
        ib = streams._int(e, "index_bytes", 0, len(rest))
        mask = streams.decode_index(rest[:ib], e.get("index") or {}, n)
        sym = streams.decode_symbols(rest[ib:], e.get("values") or {}, int(mask.sum()))
        if len(sym) != int(mask.sum()):
            raise ValueError("wrong symbol count")
    else:
        raise ValueError("unknown mode")
    if (e.get("values") or {}).get("alpha") != alpha:
        raise ValueError("alphabet does not match the encoding")
    if enc == "codebook":
        vals = table[sym]
        out = np.zeros(n, dtype=np.float32)
        if mask is None:
            out = vals
        else:
            out[mask] = vals
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)
    # uniform: value = (code + lo - zp) * scale, computed in float32 exactly as quantize does
    scale = torch.from_numpy(np.frombuffer(params[:4 * c], dtype="<f4").astype(np.float32))
    zp = torch.from_numpy(np.frombuffer(params[4 * c:], dtype="<f4").astype(np.float32)) if affine else None
    lo, _ = qrange(bits, not affine)
    codes = np.zeros(n, dtype=np.int64)
    if mask is None:
        codes[:] = sym
    else:
        zero_code = (-lo) if not affine else None
        if affine:
            per = np.repeat(zp.numpy().astype(np.int64), n // c)
            codes[:] = per
        else:
            codes[:] = zero_code
        codes[mask] = sym
    q = torch.from_numpy((codes + lo).astype(np.float32)).view(c, -1)
    w = (q - zp[:, None]) * scale[:, None] if affine else q * scale[:, None]
    w = w + 0.0  # no negative zeros
    return w.reshape(shape), scale, zp


def decode_model(blob: bytes, path="<bytes>") -> nn.Module:
    manifest, start = read_manifest(blob, path)
    end = len(blob) - 4
    tensors, quant = {}, {}
    for e in manifest["tensors"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            _fail(path, "malformed tensor entry")
        off, ln, crc = e.get("offset"), e.get("length"), e.get("crc")
        if not all(isinstance(v, int) and v >= 0 for v in (off, ln, crc)) or start + off + ln > end:
            _fail(path, f"section of {e['name']} lies outside the file")
        data = blob[start + off:start + off + ln]
        if zlib.crc32(data) != crc:
            _fail(path, f"checksum mismatch in {e['name']}")
        try:
            t = _decode_tensor(e, data)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
            _fail(path, f"tensor {e['name']}: {err}")
        if isinstance(t, tuple):
            t, scale, zp = t
            quant[e["name"]] = {"bits": e["bits"], "scheme": "uniform", "scale": scale,
                                "zero_point": zp if zp is not None else torch.zeros_like(scale),
                                "symmetric": not e["affine"], "per_channel": bool(e.get("per_channel", True))}
        elif e.get("enc") == "codebook":
            d = blob[start + off:start + off + e["params_bytes"]]
            quant[e["name"]] = {"bits": e["bits"], "scheme": "kmeans",
                                "codebook": torch.from_numpy(np.frombuffer(d, dtype="<f4").copy())}
        tensors[e["name"]] = t
    try:
        model = arch_mod.rebuild(manifest["arch"], tensors)
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        _fail(path, f"architecture: {err}")
    mods = dict(model.named_modules())
    for name, info in quant.items():
        mod_name = name.rpartition(".")[0]
        setattr(mods[mod_name], QUANT_ATTR, info)
    model.eval()
    return model


def load_cpz(path) -> nn.Module:
    """Decode a .cpz file into a runnable module (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size > 16 << 30:
        _fail(path, "file too large")
    return decode_model(path.read_bytes(), path)


def read_stats(path) -> dict[str, Any]:
    blob = Path(path).read_bytes()
    manifest, _ = read_manifest(blob, path)
    return {"manifest_bytes": HEAD.unpack_from(blob, 0)[3], "tensors": [tensor_row(e) for e in manifest["tensors"]]}


def tensor_row(e: dict) -> dict:
    """Per-tensor numbers for tables: bytes, bits per weight, index overhead, Huffman gain."""
    n = int(np.prod(e["shape"])) if e["shape"] else 1
    row = {"name": e["name"], "enc": e["enc"], "numel": n, "bytes": e["length"],
           "bits_per_weight": round(8 * e["length"] / max(n, 1), 3), "mode": e.get("mode", "-")}
    if "index_bytes" in e:
        row["index_bytes"] = e["index_bytes"]
        row["index"] = e["index"]["index"]
    v = e.get("values")
    if v:
        coded = e["length"] - e.get("params_bytes", 0) - e.get("index_bytes", 0)
        row["bits"] = e.get("bits")
        row["coding"] = v["coding"]
        row["huffman_gain"] = round(v["fixed_bytes"] / max(coded, 1), 3) if v["count"] else 1.0
    return row
