"""One tensor section of a .cpz: raw, sparse raw, or quantized codes (a uniform grid's scales or a
k-means codebook in front of Huffman-coded symbols, dense or with a sparse index). Decoding checks
every length and alphabet against the manifest entry, within the file's decoding budget."""

from __future__ import annotations

import numpy as np
import torch

from compress import quantize  # noqa: F401  (importing it registers the built-in schemes a file may name)
from compress.coding import streams
from compress.errors import InputError
from compress.quant_state import QuantState, lookup_bytes, schemes

MAX_NUMEL = 1 << 31
_STORAGE = {"uniform": "grid", "codebook": "codebook"}  # the manifest's "enc" -> a scheme's storage
_OLD_SCHEME = {"uniform": "minmax", "codebook": "kmeans"}  # files written before "scheme" was stored
_RAW_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "uint8": np.uint8,
    "int8": np.int8,
    "bool": np.bool_,
}


def _raw(t: torch.Tensor) -> tuple[bytes, dict]:
    a = t.detach().cpu().contiguous().numpy()
    return a.astype(a.dtype.newbyteorder("<")).tobytes(), {"enc": "raw"}


def _has_negative_zero(t: torch.Tensor) -> bool:
    return bool(((t == 0) & torch.signbit(t)).any())


def _coded(
    sym: np.ndarray, zero: np.ndarray, alpha: int, params: bytes, fields: dict, coder: str
) -> tuple[bytes, dict]:
    """Dense (all symbols) or sparse (index + nonzero symbols), the smaller; each stream coded by
    ``coder`` (``streams.CODERS``)."""
    dense, df = streams.encode_symbols(sym, alpha, coder=coder)
    best = (params + dense, {**fields, "mode": "dense", "params_bytes": len(params), "values": df})
    nz = ~zero
    if zero.any():
        idx, ifl = streams.encode_index(nz, coder)
        vals, vf = streams.encode_symbols(sym[nz], alpha, coder=coder)
        if len(idx) + len(vals) < len(dense):
            best = (
                params + idx + vals,
                {
                    **fields,
                    "mode": "sparse",
                    "params_bytes": len(params),
                    "index_bytes": len(idx),
                    "index": ifl,
                    "values": vf,
                },
            )
    return best


def _scheme_field(state: QuantState, enc: str) -> dict:
    """The scheme's name, unless it is the one a section of that kind was before names were stored."""
    return {} if state.scheme == _OLD_SCHEME[enc] else {"scheme": state.scheme}


def _encode_state(state: QuantState, t: torch.Tensor, coder: str) -> tuple[bytes, dict]:
    """A quantized weight: its codes as they are, with the grid's scales or the codebook in front."""
    zero = (t.detach().flatten() == 0).cpu().numpy()
    bits = int(state.bits)
    if state.codebook is not None:
        cb = state.codebook.float().cpu().numpy().astype("<f4")
        k = len(cb)
        sym = state.codes.flatten().cpu().numpy().astype(np.int64)
        sym[sym < 0] = k  # explicit zero symbol for dense mode
        half = bool(np.array_equal(cb.astype("<f2").astype("<f4"), cb))  # k-means rounds its centroids so
        fields = {
            "enc": "codebook",
            **_scheme_field(state, "codebook"),
            "bits": bits,
            "k": k,
            **({"cb16": True} if half else {}),
        }
        return _coded(sym, zero, k + 1, (cb.astype("<f2") if half else cb).tobytes(), fields, coder)
    if state.scale is None:
        raise ValueError("a grid state needs its scales")
    scale = state.scale.float().cpu().numpy().astype("<f4")
    params = scale.tobytes()
    affine = state.zero_point is not None
    if state.zero_point is not None:
        params += state.zero_point.float().cpu().numpy().astype("<f4").tobytes()
    sym = state.codes.cpu().numpy().reshape(-1).astype(np.int64)
    return _coded(
        sym,
        zero,
        2**bits,
        params,
        {
            "enc": "uniform",
            **_scheme_field(state, "uniform"),
            "bits": bits,
            "channels": len(scale),
            "affine": affine,
            "per_channel": bool(state.per_channel),
        },
        coder,
    )


def encode_tensor(
    t: torch.Tensor, state: QuantState | None = None, where: str = "", coder: str = "auto"
) -> tuple[bytes, dict]:
    """A tensor's section and its manifest fields. ``coder``: ``auto`` (the smallest coding of each
    stream), ``huffman`` (the codings before the ANS coder: the same bytes as those files) or
    ``context`` (ANS-coded streams wherever there is one)."""
    streams.check_coder(coder)
    if state is not None:
        try:
            state.check(t, where)
        except ValueError as e:
            raise InputError(str(e)) from e
        return _encode_state(state, t, coder)
    if t.dtype == torch.float32 and t.numel() > 64 and not _has_negative_zero(t):
        flat = t.detach().flatten().cpu()
        zero = (flat == 0).numpy()
        if zero.mean() > 0.5:  # pruned but not quantized: positions + fp32 nonzero values
            idx, ifl = streams.encode_index(~zero, coder)
            vals = flat.numpy()[~zero].astype("<f4").tobytes()
            return idx + vals, {"enc": "sparse_raw", "index": ifl, "index_bytes": len(idx)}
    return _raw(t)


def shape_numel(e: dict) -> tuple[list, int]:
    shape = e.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < MAX_NUMEL for s in shape)
    ):
        raise ValueError("bad shape")
    n = 1
    for s in shape:
        n *= s
        if n >= MAX_NUMEL:
            raise ValueError("tensor too large")
    return shape, n


def _decode_raw(e: dict, data: bytes | memoryview, shape: list, n: int) -> torch.Tensor:
    dtype = e.get("dtype")
    if dtype not in _RAW_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    npd = np.dtype(_RAW_DTYPES[dtype]).newbyteorder("<")
    if len(data) != n * npd.itemsize:
        raise ValueError("raw tensor has the wrong length")
    a = np.frombuffer(data, dtype=npd).astype(npd.newbyteorder("="))
    return torch.from_numpy(a.copy()).reshape(shape)


def _decode_sparse_raw(e: dict, data: bytes | memoryview, shape: list, n: int, budget) -> torch.Tensor:
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


def _symbols(
    e: dict, rest: bytes | memoryview, n: int, alpha: int, budget, dense_relabel: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The coded symbols of a quantized tensor: all n (dense, mapped by ``dense_relabel`` if given),
    or the nonzeros and their mask."""
    if _dict(e, "values").get("alpha") != alpha:
        raise ValueError("alphabet does not match the encoding")
    mode = e.get("mode")
    if mode == "dense":
        sym, mask = streams.decode_symbols(rest, _dict(e, "values"), n, budget, dense_relabel), None
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


def _scheme_name(e: dict) -> str:
    """The registered scheme a section names; it must store its state as the section does."""
    enc = str(e.get("enc"))  # "uniform" or "codebook": decode_entry checked it
    name = e.get("scheme", _OLD_SCHEME[enc])
    registered = schemes()
    if not isinstance(name, str) or name not in registered:
        known = ", ".join(n for n, s in registered.items() if s.storage == _STORAGE[enc])
        raise ValueError(f"unknown quantization scheme {str(name)[:40]!r} (known: {known})")
    if registered[name].storage != _STORAGE[enc]:
        raise ValueError(f"scheme {name!r} is not stored as {enc!r}")
    return name


def _decode_state(
    e: dict, data: bytes | memoryview, shape: list, n: int, budget
) -> tuple[QuantState, torch.Tensor | None]:
    """The quantization state of a coded weight: its codes exactly as they were written; and the
    weight where it comes cheaper from the symbols than from the state (else None)."""
    enc = e.get("enc")
    name = _scheme_name(e)
    if e.get("dtype") != "float32":
        raise ValueError("coded tensors are float32")
    bits = streams._int(e, "bits", 2, 8)
    pb = streams._int(e, "params_bytes", 0, len(data))
    params, rest = data[:pb], data[pb:]
    if enc == "codebook":
        k = streams._int(e, "k", 1, 2**bits)
        half = e.get("cb16", False)
        if not isinstance(half, bool) or pb != (2 if half else 4) * k:
            raise ValueError("codebook has the wrong size")
        # symbols < k + 1: the streams check the alphabet. The dense stream's zero symbol k is code
        # -1: decoded straight to the byte 0xFF (int8 -1) where the codes fit in a signed byte
        signed = k < 128
        relabel = np.append(np.arange(k, dtype=np.uint8), np.uint8(0xFF)) if signed else None
        cb = np.frombuffer(params, dtype="<f2" if half else "<f4").astype(np.float32)
        if not np.isfinite(cb).all():  # k-means and pow2 tables of finite weights are finite
            raise ValueError("codebook value not finite")
        sym, mask = _symbols(e, rest, n, k + 1, budget, relabel)
        weight = None
        if mask is None and signed:
            codes = sym.view(np.int8).astype(np.int16)
            weight = torch.from_numpy(lookup_bytes(cb + 0.0, sym)).view(shape)  # as state.dequantize
        elif mask is None:
            codes = sym.astype(np.int16)
            codes[codes == k] = -1
        else:
            codes = np.full(n, -1, dtype=np.int16)
            codes[mask] = sym
            if n and codes.max() >= k:
                raise ValueError("code outside the codebook")
        state = QuantState(bits, name, torch.from_numpy(codes), codebook=torch.from_numpy(cb), per_channel=False)
        return state, weight
    c = streams._int(e, "channels", 1, n if n else 1)
    affine, per_channel = e.get("affine"), e.get("per_channel", True)
    if not isinstance(affine, bool) or pb != 4 * c * (2 if affine else 1) or (n and n % c):
        raise ValueError("scales have the wrong size")
    if not isinstance(per_channel, bool) or (c > 1 and not per_channel):
        raise ValueError("'per_channel' must be a boolean (true: several scales)")
    scales = np.frombuffer(params[: 4 * c], dtype="<f4").astype(np.float32)
    zps = np.frombuffer(params[4 * c :], dtype="<f4").astype(np.float32) if affine else None
    # a grid's step is a finite number, its zero point one of its codes (as the quantizers make them)
    if not np.isfinite(scales).all():
        raise ValueError("scale not a finite number")
    if zps is not None and not ((zps == np.round(zps)) & (zps >= 0) & (zps < 2**bits)).all():
        raise ValueError(f"zero point not an integer from 0 to {2**bits - 1}")
    sym, mask = _symbols(e, rest, n, 2**bits, budget)
    scale = torch.from_numpy(scales)
    zp = torch.from_numpy(zps) if zps is not None else None
    if mask is None:
        codes = sym.astype(np.uint8, copy=False)  # symbols < 2^bits <= 256
    else:  # pruned weights are the grid's zero: code -lo (symmetric) or the channel's zero point
        lo = -(2 ** (bits - 1) - 1) if not affine else 0  # the codes fit a byte: zero points were checked
        codes = np.repeat(zps.astype(np.uint8), n // c) if zps is not None else np.full(n, -lo, dtype=np.uint8)
        codes[mask] = sym
    state = QuantState(
        bits,
        name,
        torch.from_numpy(codes).view(c, -1),
        scale,
        zp,
        per_channel=per_channel,
    )
    return state, None


def decode_entry(e: dict, data: bytes | memoryview, budget) -> tuple[torch.Tensor, QuantState | None]:
    """One tensor section -> (tensor, its quantization state or None)."""
    shape, n = shape_numel(e)  # charged to the budget up front (container._charge)
    enc = e.get("enc")
    if enc == "raw":
        return _decode_raw(e, data, shape, n), None
    if e.get("dtype") != "float32":
        raise ValueError("coded tensors are float32")
    if enc == "sparse_raw":
        return _decode_sparse_raw(e, data, shape, n, budget), None
    if enc not in ("uniform", "codebook"):
        raise ValueError(f"unknown encoding {enc!r}")
    state, weight = _decode_state(e, data, shape, n, budget)
    return (state.dequantize(shape) if weight is None else weight), state
