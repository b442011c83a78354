"""Canonical, length-limited Huffman coding with a vectorized block-parallel decoder.

* Code lengths come from a Huffman tree (heap), limited to ``MAX_LEN`` bits with the length
  adjustment of the JPEG standard (ITU T.81, Annex K.3); only the lengths are stored, and the
  canonical code is rebuilt from them.
* The symbol stream is cut into blocks of ``block`` symbols and the bit offset of every block is
  stored (sync points). Decoding steps through all blocks at once: each step reads a ``MAX_LEN``-bit
  window at every block's position, looks up (symbol, length) in a 2^MAX_LEN table, and advances.
  That is ``block`` numpy steps over ``n / block`` lanes, not a per-bit Python loop.
* Everything read is checked: lengths form a prefix code (Kraft), every block must end exactly where
  the next one starts, and no invalid code may appear. A decoder error is a ``ValueError``.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LEN = 15
DEFAULT_BLOCK = 512


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


def check_lengths(lengths: np.ndarray, max_len: int = MAX_LEN) -> None:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > max_len):
        raise ValueError("code length out of range")
    kraft = sum(2.0 ** -int(n) for n in lengths if n > 0)
    if kraft > 1.0 + 1e-12:
        raise ValueError("code lengths do not form a prefix code")


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


def build_table(lengths: np.ndarray, max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, length) for every max_len-bit window; symbol -1 where no code matches."""
    lengths = np.asarray(lengths, dtype=np.int64)
    check_lengths(lengths, max_len)
    codes = canonical_codes(lengths)
    sym = np.full(1 << max_len, -1, dtype=np.int32)
    tl = np.zeros(1 << max_len, dtype=np.int32)
    for s in np.nonzero(lengths)[0]:
        n = int(lengths[s])
        lo = int(codes[s]) << (max_len - n)
        hi = (int(codes[s]) + 1) << (max_len - n)
        sym[lo:hi] = s
        tl[lo:hi] = n
    return sym, tl


def decode(
    payload: bytes,
    lengths: np.ndarray,
    count: int,
    block_bits: np.ndarray,
    block: int = DEFAULT_BLOCK,
    max_len: int = MAX_LEN,
) -> np.ndarray:
    """Inverse of ``encode``: ``count`` symbols (int32). Raises ValueError on any inconsistency."""
    if count == 0:
        if len(payload) or len(block_bits):
            raise ValueError("data present for an empty stream")
        return np.zeros(0, dtype=np.int32)
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
    sym_t, len_t = build_table(lengths, max_len)
    table = (sym_t.astype(np.int32) << 8) | len_t  # one gather per step: symbol << 8 | length
    # 24-bit window at every byte (max_len + 7 <= 24); padded so that a corrupt stream, which can
    # run at most block * max_len bits past its start, never reads outside the array
    pad = block * max_len // 8 + 4
    b = np.concatenate([np.frombuffer(payload, dtype=np.uint8), np.zeros(pad, dtype=np.uint8)]).astype(np.int32)
    win = (b[:-2] << 16) | (b[1:-1] << 8) | b[2:]
    mask = (1 << max_len) - 1
    shift0 = 24 - max_len
    pos = np.concatenate([[0], ends[:-1]]).astype(np.int32)
    out = np.empty((min(block, count) if nblocks == 1 else block, nblocks), dtype=np.int32)  # row i: i-th symbols
    last = count - (nblocks - 1) * block  # symbols in the last block
    pos_last = None
    e = np.empty(nblocks, dtype=np.int32)
    steps = block if nblocks > 1 else count  # a short stream needs only `count` steps, not `block`
    for i in range(steps):
        if i == last:
            pos_last = int(pos[-1])
        np.take(win, pos >> 3, out=e)
        e >>= shift0 - (pos & 7)
        e &= mask
        np.take(table, e, out=e)
        np.right_shift(e, 8, out=out[i])
        e &= 0xFF
        pos += e
    if pos_last is not None:
        pos[-1] = pos_last
    flat = out.T.ravel()[:count] if last == block else np.concatenate([out[:, :-1].T.ravel(), out[:last, -1]])
    if not np.array_equal(pos, ends) or (flat < 0).any():
        raise ValueError("corrupt Huffman stream")
    return flat
