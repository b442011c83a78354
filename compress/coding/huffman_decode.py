"""Vectorised decoding of a canonical prefix code, for ``huffman.decode`` (which checks every size first).

Two decoders, both numpy operations over whole arrays, never a Python step per symbol:

* ``chain`` (short streams): the code that starts at *every* bit is looked up at once, giving the
  next symbol's start from each bit; doubling that jump (a jump of 2, 4, 8 ... symbols) lays out
  every block's symbol starts in log2(block) gathers. Work: about log2(block) times the stream's bits.
* ``lanes`` (long streams): one lane per block, all lanes stepping together. A step looks up the
  next ``WINDOW`` bits of every lane in a table that yields the k symbols that fit in them (k = 1, 2
  or 4, packed into one word), so every lane takes exactly k symbols a step and step s writes row s.
  The few lanes whose k codes overrun the window complete their group with further lookups before
  the next step. Work: block / k steps over n / block lanes.

Both give every lane's end bit; the caller checks it against the sync points, which also catches a
bit pattern that no code matches (in ``chain``; in ``lanes`` such a pattern decodes to a sentinel
symbol that the caller rejects).
"""

from __future__ import annotations

import numpy as np
import torch

WINDOW = 16  # bits a lane looks up at once (more where a code is longer)
MAX_WIDTH = 16  # the longest code (the entry layout below has room for 16-bit windows)
# a lanes table entry: word | missing << (32 + width) | (bits read + _MISSING if symbols are missing) << _BITS
_BITS = 56
_MISSING = 32
_DTYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}
_SIGNED = {8: np.int8, 16: np.int16, 32: np.int32}  # torch has no unsigned views: transpose these


def canonical_order(lengths: np.ndarray) -> np.ndarray:
    """The coded symbols in canonical order (by length, then symbol): code i starts the windows
    after those of codes 0 .. i-1."""
    used = np.flatnonzero(lengths)
    return used[np.argsort(lengths[used], kind="stable")]


def windows(payload: bytes | memoryview) -> np.ndarray:
    """The 64 bits (MSB first) that start at every second byte of ``payload`` (zeros past its end):
    ``windows[b >> 4] << (b & 15)`` holds at least 49 bits from bit b on."""
    raw = np.zeros(len(payload) + 9, dtype=np.uint8)
    raw[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    return np.ndarray(((len(raw) - 8) // 2 + 1,), dtype=">u8", buffer=raw, strides=(2,)).astype(np.uint64)


def _at(win: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The (at least 49) bits from each of ``bits`` on, MSB first in a uint64."""
    return win.take((bits >> 4).view(np.int64), mode="wrap") << (bits & 15)  # int64 indices: taken as they are


def _first_codes(lengths: np.ndarray, width: int, values: np.ndarray, sentinel: int) -> np.ndarray:
    """For every ``width``-bit window: value << 8 | length of the code it starts with (length 0 and
    ``sentinel`` where no code does)."""
    order = canonical_order(lengths)
    span = np.left_shift(1, width - lengths[order])
    filled = int(span.sum())
    first = np.full(1 << width, sentinel << 8, dtype=np.int64)
    first[:filled] = np.repeat((values[order] << 8) | lengths[order], span)
    return first


# ----------------------------------------------------------------------------- short streams
def chain(
    win: np.ndarray,
    lengths: np.ndarray,
    values: np.ndarray,
    dtype: type,
    total: int,
    starts: np.ndarray,
    block: int,
    last: int,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (``values`` of the symbols in order, as ``dtype``; the bit where every lane stopped, past
    ``total`` where a code ran off the stream or no code matched)."""
    width = int(lengths.max())
    first = _first_codes(lengths, width, values, 0)
    bits = np.arange(total, dtype=np.int64)
    at = first.take((_at(win, bits.astype(np.uint64)) >> np.uint64(64 - width)).view(np.int64))  # (total,)
    ln = at & 0xFF
    sink = total + 1  # past the end: where a bad code leads, and stays
    jump = np.full(total + 2, sink, dtype=np.int64)  # jump[b]: where the code at bit b ends
    nxt = bits + ln
    jump[:total] = np.where((ln > 0) & (nxt <= total), nxt, sink)
    symbol: np.ndarray = np.append(at >> 8, [0, 0]).astype(dtype)
    span = block if len(starts) > 1 else last
    at_step = starts[:, None]  # (lanes, 2^j): the starts of each lane's first 2^j symbols
    levels = span.bit_length()  # 2^levels > span: the starts of symbols 0 .. span, the ends included
    for j in range(levels):
        at_step = np.concatenate([at_step, jump.take(at_step)], axis=1)
        if j + 1 < levels:
            jump = jump.take(jump)  # two jumps: 2^(j+1) symbols
    stop = np.append(at_step[:-1, block], at_step[-1, last]) if len(starts) > 1 else at_step[:, last]
    sym = symbol.take(at_step[:, :span])
    flat = sym.reshape(-1) if last == span else np.concatenate([sym[:-1].reshape(-1), sym[-1, :last]])
    return flat, stop


# ----------------------------------------------------------------------------- long streams
def group_size(lengths: np.ndarray, slot: int, width: int, lanes: int) -> int:
    """Symbols a lane takes a step (1, 2 or 4, at most one 32-bit word of slots): the fewest steps,
    weighed against the lookups that complete the groups that overrun a window.

    Taking symbol s to occur 2^-length(s) of the time, a group of k overruns with the chance that k
    lengths sum past ``width``. Costs in microseconds, roughly: a numpy call 1, plus 1 per 1,000
    lanes (3 per 1,000 for the gathers of the lanes that overrun); a step makes 10 calls, and 25
    more where any lane overruns."""
    used = lengths[lengths > 0]
    weights = np.bincount(used, weights=np.ldexp(1.0, -used))
    pmf = weights / weights.sum()  # of one code's length
    best, cost = 1, float("inf")
    for k in (1, 2, 4)[: {8: 3, 16: 2, 32: 1}[slot]]:
        total = pmf
        for _ in range(k - 1):
            total = np.convolve(total, pmf)
        overrun = float(total[width + 1 :].sum())
        step = 10 * (1 + lanes / 1000) + 25 * ((1 - (1 - overrun) ** lanes) + 3 * lanes * overrun / 1000)
        if step / k < cost:
            best, cost = k, step / k
    return best


def tables(lengths: np.ndarray, width: int, k: int, slot: int, values: np.ndarray, sentinel: int) -> np.ndarray:
    """Lookup entries for every ``width``-bit window and every need q = 0..k, flat at ``q << width | window``.

    Entry q decodes the first min(q, fitting) symbols of the window into slots k - q .. k - 1 of a
    word (so a lane that holds k - q symbols of its group ORs them in place), with the bits they take
    and how many are still missing. q = 0 is all zeros (a lane that has finished). A window that
    starts with no code (an incomplete code) yields ``sentinel`` in every slot and reads 1 bit."""
    size = 1 << width
    first = _first_codes(lengths, width, values, sentinel).astype(np.uint32)
    first[(first & 0xFF) == 0] |= 0xFF  # no code: a length that never fits
    window = np.arange(size, dtype=np.uint32)
    word, off, got = (np.zeros(size, dtype=np.uint32) for _ in range(3))
    table = np.zeros((k + 1, size), dtype=np.uint64)
    e, n, fit = (np.empty(size, dtype=np.uint32) for _ in range(3))
    for j in range(k):  # round j decodes the (j+1)-th symbol of every window, where it still fits
        # a symbol that does not fit leaves `off` as it is, so it does not fit in any later round either
        first.take(np.bitwise_and(window << off, size - 1, out=e), out=e)
        np.bitwise_and(e, 0xFF, out=n)
        np.less_equal(n, width - off, out=fit)
        e >>= 8
        e *= fit
        e <<= slot * j
        word |= e
        n *= fit
        off += n
        got += fit
        q = j + 1
        np.subtract(q, got, out=n)  # symbols still missing
        entry = table[q]
        entry[:] = word
        entry <<= slot * (k - q)
        entry |= n.astype(np.uint64) << (32 + width)
        np.add(off, (n > 0) * np.uint32(_MISSING), out=e)
        entry |= e.astype(np.uint64) << _BITS
    filled = int(np.count_nonzero((first & 0xFF) != 0xFF))  # windows that start with a code come first
    if filled < size:  # no code starts these: the sentinel marks the stream corrupt
        for q in range(1, k + 1):
            fill = sum(sentinel << (slot * i) for i in range(k - q, k))
            table[q, filled:] = fill | (1 << _BITS)
    return table.ravel()


def lanes(
    win: np.ndarray, table: np.ndarray, width: int, starts: np.ndarray, block: int, last: int, k: int, slot: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every block at once, one lane per block (``block`` symbols from each start bit, ``last``
    in the final block) -> (the symbols in order, the bit where every lane stopped)."""
    count, size = len(starts), 1 << width
    steps = -(-(block if count > 1 else last) // k)
    refill = 49 // width  # steps a refilled 64-bit buffer lasts: it holds at least 49 unread bits
    shift = np.uint64(64 - width)
    main = table[k * size : (k + 1) * size]
    pos = starts.astype(np.uint64)
    buf, v, e, b, r = (np.empty(count, dtype=np.uint64) for _ in range(5))
    flag = np.empty(count, dtype=bool)
    out = np.empty((steps, count), dtype=_DTYPES[k * slot])  # row s: symbols s*k .. s*k + k - 1 of every lane
    for s in range(steps):
        if s % refill == 0:
            win.take(np.right_shift(pos, 4, out=v).view(np.int64), out=buf, mode="wrap")
            buf <<= np.bitwise_and(pos, 15, out=r)
        np.right_shift(buf, shift, out=v)
        q_full, q_last = min(k, block - s * k), min(k, max(0, last - s * k))  # symbols due this step
        if q_full == q_last == k:
            main.take(v.view(np.int64), out=e, mode="wrap")
        elif q_full == q_last:
            table.take((v | np.uint64(q_full << width)).view(np.int64), out=e, mode="wrap")
        else:
            q = np.full(count, q_full << width, dtype=np.uint64)
            q[-1] = q_last << width
            table.take((v | q).view(np.int64), out=e, mode="wrap")
        np.right_shift(e, _BITS, out=b)
        buf <<= b
        pos += b
        row = out[s]
        np.copyto(row, e, casting="unsafe")  # the word: the low k * slot bits
        missing = np.greater_equal(b, _MISSING, out=flag).nonzero()[0]
        if missing.size:
            _complete(win, table, width, e, missing, pos, buf, row)
        if q_full < k:  # those symbols sit in the word's top slots: move them down
            row[:-1] >>= slot * (k - q_full)
        if q_last < k:
            row[-1] = row[-1] >> (slot * (k - q_last)) if q_last else 0
    # the (lanes, steps) words, transposed (torch copies in cache-sized blocks), are each lane's symbols
    sym = np.empty((count, steps * k), dtype=_DTYPES[slot])
    torch.from_numpy(sym.view(_SIGNED[k * slot])).copy_(torch.from_numpy(out.view(_SIGNED[k * slot])).T)
    flat = sym.reshape(-1) if last == block == steps * k else np.concatenate([sym[:-1, :block].ravel(), sym[-1, :last]])
    return flat, pos.astype(np.int64)


def _complete(win, table, width: int, e, lanes, pos, buf, row) -> None:
    """Lanes whose k symbols did not fit in one window: further lookups, each for the symbols still
    missing, until every group is whole (at most k - 1 rounds: each lookup yields a symbol)."""
    need_bits, shift = np.uint64(7 << width), np.uint64(64 - width)
    word = e[lanes]
    need = (word >> np.uint64(32)) & need_bits  # missing << width: the table to look in
    p = pos[lanes] - _MISSING  # the main step added _MISSING to flag them
    x = _at(win, p)
    got = table.take(((x >> shift) | need).view(np.int64), mode="wrap")
    read = (got >> _BITS) & (_MISSING - 1)
    p += read
    word |= got
    x <<= read  # >= 49 - width unread bits: enough for the (at most 2) steps until the next refill
    need = (got >> np.uint64(32)) & need_bits
    if np.count_nonzero(need):  # a few groups of long codes need a third window (or more)
        todo = need.nonzero()[0]
        while todo.size:
            pt = p[todo]
            xt = _at(win, pt)
            got = table.take(((xt >> shift) | need[todo]).view(np.int64), mode="wrap")
            read = (got >> _BITS) & (_MISSING - 1)
            p[todo] = pt + read
            word[todo] |= got
            x[todo] = xt << read
            need[todo] = (got >> np.uint64(32)) & need_bits
            todo = todo[need[todo] != 0]
    row[lanes] = word  # the low bits: the whole group
    pos[lanes] = p
    buf[lanes] = x
