"""Canonical, length-limited Huffman coding with vectorized decoders.

* Code lengths come from a Huffman tree (heap), limited to ``MAX_LEN`` bits with the length
  adjustment of the JPEG standard (ITU T.81, Annex K.3); only the lengths are stored, and the
  canonical code is rebuilt from them.
* The symbol stream is cut into blocks of ``block`` symbols and the bit offset of every block is
  stored (sync points). Decoding works on all blocks at once, in numpy operations over whole arrays,
  never a Python step per symbol (``huffman_decode``): a short stream by looking up the code at every
  bit and doubling the jumps from code to code, a long one by stepping every block together, 16 bits
  and up to 4 symbols a lookup.
* Everything read is checked, its size before any work: lengths form a prefix code (Kraft), every
  block must end exactly where the next one starts, and no invalid code may appear. A decoder error
  is a ``ValueError``.
"""

from __future__ import annotations

import heapq

import numpy as np

from compress.coding import huffman_decode as D

MAX_LEN = 15
DEFAULT_BLOCK = 512
# The most symbols a block may hold in a file read (every file compress writes has blocks of 512). It bounds the
# long-stream decoder's steps a stream (512 / group size), whose numpy calls are the one cost of decoding that
# does not grow with the stream's bytes: with blocks of 4,096 and codes chosen to overrun every step, a few
# lanes of 15-bit codes took 6 us of CPU a byte of file (128 work units, ~1.3 us, are what a byte may ask for).
MAX_BLOCK = DEFAULT_BLOCK


def code_lengths(freqs: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Length-limited Huffman code lengths for ``freqs`` (0 for unused symbols)."""
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(len(freqs), dtype=np.int64)
    used = np.nonzero(freqs > 0)[0]
    if len(used) == 0:
        return lengths
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths
    if len(used) > (1 << max_len):
        raise ValueError("alphabet too large for the code length limit")
    # Huffman tree depths via a heap of (weight, tiebreak, [symbols])
    heap = [(int(freqs[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    depth = {int(s): 0 for s in used}
    while len(heap) > 1:
        w1, t1, s1 = heapq.heappop(heap)
        w2, t2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            depth[s] += 1
        heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
    maxd = max(depth.values())
    bits = np.zeros(max(maxd, max_len) + 1, dtype=np.int64)
    for d in depth.values():
        bits[d] += 1
    # JPEG Annex K.3: move over-long codes up, keeping the Kraft sum
    for i in range(maxd, max_len, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    # most frequent symbols get the shortest codes
    order = sorted(used, key=lambda s: (-int(freqs[s]), int(s)))
    k = 0
    for ln in range(1, max_len + 1):
        for _ in range(int(bits[ln])):
            lengths[order[k]] = ln
            k += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (sorted by (length, symbol))."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.nonzero(lengths)[0], key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s] - prev)
        codes[s] = code
        code += 1
        prev = int(lengths[s])
    return codes


def encoded_bits(freqs: np.ndarray, lengths: np.ndarray) -> int:
    return int((np.asarray(freqs, np.int64) * np.asarray(lengths, np.int64)).sum())


def encode(symbols: np.ndarray, lengths: np.ndarray, block: int = DEFAULT_BLOCK) -> tuple[bytes, np.ndarray]:
    """-> (payload bytes, bit length of every block (uint16 array))."""
    symbols = np.asarray(symbols, dtype=np.int64)
    n = len(symbols)
    if n == 0:
        return b"", np.zeros(0, dtype=np.uint16)
    codes = canonical_codes(lengths)
    ln = np.asarray(lengths, dtype=np.int64)[symbols]
    if (ln == 0).any():
        raise ValueError("a symbol has no code")
    cv = codes[symbols]
    ends = np.cumsum(ln)
    starts = ends - ln
    total = int(ends[-1])
    bits = np.zeros(total, dtype=np.uint8)
    for j in range(int(ln.max())):
        sel = ln > j
        bits[starts[sel] + j] = ((cv[sel] >> (ln[sel] - 1 - j)) & 1).astype(np.uint8)
    nblocks = (n + block - 1) // block
    block_ends = ends[np.minimum(np.arange(1, nblocks + 1) * block, n) - 1]
    block_bits = np.diff(np.concatenate([[0], block_ends]))
    if block_bits.max() > 0xFFFF:
        raise ValueError("block too long for 16-bit offsets; use a smaller block")
    return np.packbits(bits).tobytes(), block_bits.astype(np.uint16)


# ----------------------------------------------------------------------------- decoding
# Streams of up to CHAIN_BITS bits decode by jumping from every bit at once (work ~ bits * log2(block)),
# longer ones by stepping all blocks together (see huffman_decode).
CHAIN_BITS = 1 << 17


def _kraft(lengths: np.ndarray, max_len: int) -> int:
    """Kraft sum of ``lengths`` in units of 2^-max_len (exact): 2^max_len for a complete code."""
    used = lengths[lengths > 0]
    return int(np.left_shift(np.int64(1), max_len - used).sum())


def check_lengths(lengths: np.ndarray, max_len: int = MAX_LEN) -> None:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > max_len):
        raise ValueError("code length out of range")
    if _kraft(lengths, max_len) > 1 << max_len:
        raise ValueError("code lengths do not form a prefix code")


def decode(
    payload: bytes | memoryview,
    lengths: np.ndarray,
    count: int,
    block_bits: np.ndarray,
    block: int = DEFAULT_BLOCK,
    max_len: int = MAX_LEN,
    relabel: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of ``encode``: ``count`` symbols (uint8 where the alphabet allows, else wider), or
    ``relabel[symbols]`` (``relabel``: uint8, one value per symbol, applied inside the lookups).

    Raises ValueError on any inconsistency: a wrong number of sync points or stream length (checked
    before any work), code lengths that are no prefix code, a block that does not end where the next
    one starts, or a bit pattern that no code matches."""
    if count == 0:
        if len(payload) or len(block_bits):
            raise ValueError("data present for an empty stream")
        return np.zeros(0, dtype=np.uint8)
    nblocks = (count + block - 1) // block
    block_bits = np.asarray(block_bits, dtype=np.int64)
    if len(block_bits) != nblocks:
        raise ValueError("wrong number of sync points")
    ends = np.cumsum(block_bits)
    total = int(ends[-1])
    if (total + 7) // 8 != len(payload):
        raise ValueError("stream length does not match its sync points")
    if total > count * max_len or total < count:
        raise ValueError("stream length impossible for its symbol count")
    if max_len > D.MAX_WIDTH:
        raise ValueError(f"codes longer than {D.MAX_WIDTH} bits are not supported")
    lengths = np.asarray(lengths, dtype=np.int64)
    check_lengths(lengths, max_len)
    if not lengths.any():
        raise ValueError("no code for a non-empty stream")
    alpha = len(lengths)
    if alpha > 1 << 16:
        raise ValueError("alphabet too large")
    values = np.arange(alpha, dtype=np.int64) if relabel is None else np.asarray(relabel, dtype=np.int64)
    starts, last = np.concatenate([[0], ends[:-1]]), count - (nblocks - 1) * block
    win = D.windows(payload)
    if total <= CHAIN_BITS:
        dtype = (
            np.uint8
            if relabel is not None
            else next(t for t in (np.uint8, np.uint16, np.uint32) if alpha <= np.iinfo(t).max + 1)
        )
        sym, stop = D.chain(win, lengths, values, dtype, total, starts, block, last)
        if not np.array_equal(stop, ends):
            raise ValueError("corrupt Huffman stream")
        return sym
    complete = _kraft(lengths, max_len) == 1 << max_len  # then every window starts with a code
    baked = relabel is not None and complete  # else a sentinel marks windows that start no code
    # the narrowest slot that holds every value, and the sentinel (alpha) where a window may start no code
    slot = 8 if baked else next(b for b in (8, 16, 32) if alpha <= (1 << b) - (0 if complete else 1))
    width = max(D.WINDOW, int(lengths.max()))
    k = D.group_size(lengths, slot, width, nblocks)
    table = D.tables(lengths, width, k, slot, values if baked else np.arange(alpha), alpha)
    sym, stop = D.lanes(win, table, width, starts, block, last, k, slot)
    if not np.array_equal(stop, ends):
        raise ValueError("corrupt Huffman stream")
    if not complete and sym.max() >= alpha:
        raise ValueError("corrupt Huffman stream (a bit pattern that no code matches)")
    return relabel[sym] if relabel is not None and not baked else sym
