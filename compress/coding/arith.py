"""Adaptive arithmetic (range) coding of a symbol stream, with ``constriction``'s range coder.

The model is an adaptive order-0 one, learnt from the data already coded, so the file stores no
probability table: the stream is cut into chunks that double in length (``FIRST_CHUNK``, then 16,
32, 64 ... symbols: about log2(n) chunks), each coded with one categorical distribution, the
counts of all symbols before it (``INCREMENT`` per symbol, on a floor of 1 for every symbol of the
alphabet). Encoder and decoder compute the same float64 counts from the same integers, so the
models agree exactly. One library call per chunk and a bincount between chunks: decoding stays
vectorised, about log2(n) Python steps per stream (not one per symbol or per row).

Why order-0 and not spatial contexts: on the LeNet and ResNet-20 files of docs/results.md, contexts
from already-decoded neighbours (the previous output channel's co-located weight, a column's or a
row's density so far) learnt more slowly than they paid; see docs/methods.md.
"""

from __future__ import annotations

import numpy as np

FIRST_CHUNK = 16
INCREMENT = 8  # a symbol seen counts 8 times the floor: the floor (1) is the prior of one eighth of a symbol
MAX_ALPHA = 4096


def chunks(n: int) -> list[tuple[int, int]]:
    """[lo, hi) of each chunk: 16, 16, 32, 64 ... symbols, the last one cut at n."""
    out, lo, size = [], 0, FIRST_CHUNK
    while lo < n:
        hi = min(n, lo + size)
        out.append((lo, hi))
        size = FIRST_CHUNK if lo == 0 else 2 * size
        lo = hi
    return out


def _model(counts: np.ndarray):
    import constriction  # a compiled library: imported where a range-coded stream is met

    # normalised by the library, which gives every symbol a nonzero share
    return constriction.stream.model.Categorical(counts, perfect=False)


def encode(sym: np.ndarray, alpha: int) -> bytes:
    """The range-coded words (little-endian uint32) of ``sym`` (ints below ``alpha``)."""
    import constriction

    sym = np.asarray(sym, dtype=np.int32)
    counts = np.ones(alpha, dtype=np.float64)
    enc = constriction.stream.queue.RangeEncoder()
    for lo, hi in chunks(len(sym)):
        part = sym[lo:hi]
        enc.encode(part, _model(counts))
        counts += INCREMENT * np.bincount(part, minlength=alpha)
    return enc.get_compressed().astype("<u4").tobytes()


def steps(n: int) -> int:
    return len(chunks(n))


def decode(data: bytes | memoryview, alpha: int, n: int) -> np.ndarray:
    """``n`` symbols, each below ``alpha`` (uint8 where alpha <= 256, else uint16). The caller has
    checked alpha and n and charged the work; invalid data, or data other than the encoder writes for
    the symbols decoded, raises ValueError."""
    import constriction

    if len(data) % 4:
        raise ValueError("range-coded stream is not a whole number of words")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if n and not len(words):
        raise ValueError("range-coded stream is empty")
    out = np.empty(n, dtype=np.uint8 if alpha <= 256 else np.uint16)
    counts = np.ones(alpha, dtype=np.float64)
    dec = constriction.stream.queue.RangeDecoder(words)
    try:
        for lo, hi in chunks(n):
            part = dec.decode(_model(counts), hi - lo)
            out[lo:hi] = part  # the model yields symbols of its alphabet only
            counts += INCREMENT * np.bincount(out[lo:hi], minlength=alpha)
    except (AssertionError, RuntimeError, OverflowError) as e:  # constriction refuses data no model codes
        raise ValueError(f"range-coded stream is invalid ({str(e)[:60]})") from None
    # The range decoder reads zeros past the end of its data, so a cut stream would decode to symbols:
    # the stream must be exactly what the encoder writes for them (half the cost of decoding again).
    if encode(out, alpha) != bytes(data):
        raise ValueError("range-coded stream is not the coding of its symbols (cut or altered)")
    return out
