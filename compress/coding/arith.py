"""Adaptive entropy coding of a symbol stream with ``constriction``'s ANS coder (asymmetric numeral
systems: as close to the model's information content as arithmetic coding, and faster to decode).

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


def _models(sym: np.ndarray, alpha: int, spans: list[tuple[int, int]]):
    """The model of each chunk: the counts of every symbol before it."""
    counts = np.ones(alpha, dtype=np.float64)
    for lo, hi in spans:
        yield _model(counts)
        counts += INCREMENT * np.bincount(sym[lo:hi], minlength=alpha)


def encode(sym: np.ndarray, alpha: int) -> bytes:
    """The ANS-coded words (little-endian uint32) of ``sym`` (ints below ``alpha``)."""
    import constriction

    sym = np.asarray(sym, dtype=np.int32)
    spans = chunks(len(sym))
    models = list(_models(sym, alpha, spans))
    coder = constriction.stream.stack.AnsCoder()
    for (lo, hi), model in zip(reversed(spans), reversed(models), strict=True):  # a stack: the last chunk first
        coder.encode_reverse(sym[lo:hi], model)
    return coder.get_compressed().astype("<u4").tobytes()


def steps(n: int) -> int:
    return len(chunks(n))


def decode(data: bytes | memoryview, alpha: int, n: int) -> np.ndarray:
    """``n`` symbols, each below ``alpha`` (uint8 where alpha <= 256, else uint16). The caller has
    checked alpha and n and charged the work. Decoding runs the encoder backwards and must end in the
    empty state the encoder began in, else ValueError: that refuses most cut, altered or extended
    streams, not all (an empty coder decodes zeros, so a cut stream may end empty, having decoded
    other symbols). Like any entropy code, many words decode to something: the symbols are always of
    the alphabet and the work is bounded; the section's CRC-32 is what catches damage."""
    import constriction

    if len(data) % 4:
        raise ValueError("ANS stream is not a whole number of words")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    out = np.empty(n, dtype=np.uint8 if alpha <= 256 else np.uint16)
    counts = np.ones(alpha, dtype=np.float64)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        for lo, hi in chunks(n):
            out[lo:hi] = coder.decode(_model(counts), hi - lo)  # the model yields symbols of its alphabet only
            counts += INCREMENT * np.bincount(out[lo:hi], minlength=alpha)
        empty = coder.is_empty()
    except (ValueError, AssertionError, RuntimeError, OverflowError) as e:  # constriction refuses such data
        raise ValueError(f"ANS stream is invalid ({str(e)[:60]})") from None
    if not empty:
        raise ValueError("ANS stream is not the coding of its symbols (cut, altered or extended)")
    return out
