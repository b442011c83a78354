"""Fixed-width bit packing of integer codes (INT4: two to a byte)."""

from __future__ import annotations

import numpy as np


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes (< 2^bits) MSB-first, ``bits`` each; the last byte is zero-padded."""
    codes = np.asarray(codes, dtype=np.uint32).ravel()
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    if bits == 4:
        c = codes.astype(np.uint8)
        if c.size % 2:
            c = np.append(c, np.uint8(0))
        return ((c[0::2] << 4) | c[1::2]).astype(np.uint8).tobytes()
    bitmat = ((codes[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel()).tobytes()


def unpack(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack``: ``count`` codes, uint8 for ``bits`` <= 8, else uint32."""
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise ValueError(f"packed data too short: {len(data)} < {need} bytes")
    buf = np.frombuffer(data, dtype=np.uint8, count=need)
    if bits == 8:
        return buf.copy()
    if bits == 4:
        out = np.empty((need, 2), dtype=np.uint8)
        np.right_shift(buf, 4, out=out[:, 0])
        np.bitwise_and(buf, 0x0F, out=out[:, 1])
        return out.reshape(-1)[:count]
    dtype = np.dtype(np.uint8 if bits <= 8 else np.uint32)
    bitsarr = np.unpackbits(buf)[: count * bits].reshape(count, bits).astype(dtype)
    weights = np.left_shift(1, np.arange(bits - 1, -1, -1)).astype(dtype)
    return (bitsarr * weights).sum(1, dtype=dtype)
