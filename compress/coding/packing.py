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


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack``: ``count`` codes as uint32."""
    need = (count * bits + 7) // 8
    if len(data) < need:
        raise ValueError(f"packed data too short: {len(data)} < {need} bytes")
    buf = np.frombuffer(data, dtype=np.uint8, count=need)
    if bits == 8:
        return buf.astype(np.uint32)
    if bits == 4:
        out = np.empty(need * 2, dtype=np.uint32)
        out[0::2] = buf >> 4
        out[1::2] = buf & 0x0F
        return out[:count]
    bitsarr = np.unpackbits(buf)[: count * bits].reshape(count, bits).astype(np.uint32)
    return (bitsarr << np.arange(bits - 1, -1, -1, dtype=np.uint32)).sum(1).astype(np.uint32)
