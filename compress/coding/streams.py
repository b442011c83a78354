"""Symbol and index streams inside a .cpz tensor section.

A symbol stream is Huffman coded (``huff``: 4-bit code lengths, 16-bit block sync points, payload),
fixed-width packed (``packed``) or ANS coded with an adaptive model (``ans``, ``arith.py``),
whichever is smallest. Sparse positions are either gap indices as in Deep Compression (distance to
the previous nonzero; a gap of 255 or more is spelled with filler symbols 255, each worth 255
positions) in such a stream, a plain bitmask, or the bitmask as an ANS-coded stream of 0s and 1s
(``sig``), whichever is smallest. ``coder`` chooses among them: ``huffman`` the codings of files
before the ANS coder (the very same bytes), ``context`` the ANS-coded ones, ``auto`` the
smallest of all, except that a stream of more than ``ANS_AUTO_MAX`` symbols is not ANS coded: constriction
decodes ~70 ns a symbol against the vectorised Huffman decoder's ~10 (a 2048 x 2048 4-bit layer: 0.29 s
against 0.04 s, for 1.9% fewer bytes), and a large file should open at memory speed. Each function
returns ``(bytes, fields)``; the fields go into the manifest and are checked on the way back.
"""

from __future__ import annotations

import numpy as np

from compress.coding import arith
from compress.coding import huffman as H
from compress.coding.packing import pack, unpack

GAP_FILLER = 255
CODERS = ("auto", "huffman", "context")
# the longest stream ``auto`` codes with ANS (~18 ms to decode): every stream of the LeNet and ResNet-20 files
ANS_AUTO_MAX = 1 << 18


class BudgetExceeded(ValueError):
    """A file asks for more decoding (memory or work) than its size can honestly justify."""


class Budget:
    """What decoding one file may spend, charged *before* each step: decoded elements (memory) and
    work (symbols decoded, Huffman tables built, per-step overhead). A file that would exceed it is
    refused before the expensive part, so no crafted header can make decoding take minutes or GBs."""

    def __init__(self, elements: int, work: int):
        self.elements, self.work = elements, work

    def spend(self, elements: int = 0, work: int = 0) -> None:
        self.elements -= elements
        self.work -= work
        if self.elements < 0:
            raise BudgetExceeded("it declares more decoded data than its size can hold")
        if self.work < 0:
            raise BudgetExceeded("decoding it would take far more work than its size can justify")


UNLIMITED = Budget(1 << 62, 1 << 62)


def _bits_for(alpha: int) -> int:
    return max(1, int(np.ceil(np.log2(max(alpha, 2)))))


def check_coder(coder: str) -> str:
    if coder not in CODERS:
        raise ValueError(f"unknown coder {str(coder)[:40]!r} (known: {', '.join(CODERS)})")
    return coder


def _ans_tried(coder: str, n: int) -> bool:
    """Whether ``coder`` considers ANS for a stream of ``n`` symbols (``auto``: up to ``ANS_AUTO_MAX``)."""
    return coder == "context" or (coder == "auto" and n <= ANS_AUTO_MAX)


def encode_symbols(
    sym: np.ndarray, alpha: int, block: int = H.DEFAULT_BLOCK, coder: str = "huffman"
) -> tuple[bytes, dict]:
    sym = np.asarray(sym, dtype=np.int64)
    n = len(sym)
    if n == 0:
        return b"", {"coding": "packed", "alpha": alpha, "count": 0}
    if not _ans_tried(check_coder(coder), n) or alpha > arith.MAX_ALPHA:
        return _encode_huffman(sym, alpha, block)
    ac = arith.encode(sym, alpha)
    ansf = {"coding": "ans", "alpha": alpha, "count": n}
    if coder == "context":
        return ac, ansf
    data, fields = _encode_huffman(sym, alpha, block)
    return (ac, ansf) if len(ac) < len(data) else (data, fields)


def _encode_huffman(sym: np.ndarray, alpha: int, block: int) -> tuple[bytes, dict]:
    n = len(sym)
    width = _bits_for(alpha)
    fixed = pack(sym, width)
    fields = {"coding": "packed", "alpha": alpha, "count": n}  # width: ceil(log2 alpha)
    freqs = np.bincount(sym, minlength=alpha)
    lengths = H.code_lengths(freqs)
    table = pack(lengths, 4)
    est = len(table) + 2 * ((n + block - 1) // block) + (H.encoded_bits(freqs, lengths) + 7) // 8
    if est >= len(fixed):
        return fixed, fields
    payload, block_bits = H.encode(sym, lengths, block)
    bb = block_bits.astype("<u2").tobytes()
    data = table + bb + payload
    fields.update(coding="huff", block=block, parts=[len(table), len(bb), len(payload)])
    return data, fields


def fixed_bytes(f: dict) -> int:
    """Bytes the stream described by ``f`` takes packed at a fixed width (what Huffman is measured against)."""
    return (int(f["count"]) * _bits_for(int(f["alpha"])) + 7) // 8


def decode_symbols(
    data: bytes | memoryview, f: dict, max_count: int, budget: Budget = UNLIMITED, relabel: np.ndarray | None = None
) -> np.ndarray:
    """The stream's ``count`` symbols, unsigned (uint8 for an alphabet of up to 256), each checked to
    be below ``alpha``. ``relabel`` (uint8, one value per symbol) maps them on the way: for free inside
    the Huffman tables, a gather for a packed stream."""
    alpha, n = _int(f, "alpha", 1, 1 << 16), _int(f, "count", 0, max_count)
    coding = f.get("coding")
    if coding == "ans":
        if alpha > arith.MAX_ALPHA:
            raise ValueError("ANS-coded stream's alphabet too large")
        # work: ~6 units a symbol (constriction decodes one in ~40-90 ns), a model and ~5 us per chunk
        budget.spend(work=6 * n + arith.steps(n) * (4 * alpha + 512))
        if len(data) > 4 * n + 64:  # ~32 bits a symbol at most, even for a symbol the model found rare
            raise ValueError("ANS-coded stream longer than its symbols")
        out = arith.decode(data, alpha, n)
        return out if relabel is None else relabel[out]
    huff = coding == "huff"
    block = _int(f, "block", 1, H.MAX_BLOCK) if huff else 1
    # work units of ~10 ns: a symbol each, a decoding table, and ~5 us of overhead per decoder step
    steps = (block if n > block else n) if huff else 0
    budget.spend(work=n + ((1 << H.MAX_LEN) + 512 * steps if huff else 0))  # output: charged by the tensor
    if coding == "packed":
        width = _bits_for(alpha)
        if f.get("width", width) != width or len(data) != (n * width + 7) // 8:
            raise ValueError("packed stream has the wrong length")
        out = unpack(data, width, n) if width <= 8 else _unpack_wide(data, width, n)
        if n and out.max() >= alpha:
            raise ValueError("symbol out of range")
        return out if relabel is None else relabel[out]
    if not huff:
        raise ValueError(f"unknown stream coding {coding!r}")
    parts = f.get("parts")
    if not (
        isinstance(parts, list)
        and len(parts) == 3
        and all(isinstance(p, int) and p >= 0 for p in parts)
        and sum(parts) == len(data)
    ):
        raise ValueError("Huffman stream parts do not add up")
    a, b, _ = parts
    if a != (alpha * 4 + 7) // 8 or b != 2 * ((n + block - 1) // block):
        raise ValueError("Huffman stream tables have the wrong size")
    lengths = unpack(data[:a], 4, alpha).astype(np.int64)
    bb = np.frombuffer(data[a : a + b], dtype="<u2")
    # every symbol the decoder yields is below alpha: it has a code length in the alphabet's table
    return H.decode(data[a + b :], lengths, n, bb, block, relabel=relabel)


def _unpack_wide(data, width, n):
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: n * width].reshape(n, width).astype(np.uint32)
    return (bits << np.arange(width - 1, -1, -1, dtype=np.uint32)).sum(1, dtype=np.uint32)


def _int(f: dict, key: str, lo: int, hi: int) -> int:
    v = f.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"field {key!r} missing or out of range")
    return v


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Nonzero positions -> gap symbols with fillers (see module docstring)."""
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    fill = gaps // GAP_FILLER
    out_len = len(gaps) + int(fill.sum())
    out = np.full(out_len, GAP_FILLER, dtype=np.int64)
    finals = np.cumsum(fill + 1) - 1
    out[finals] = gaps - fill * GAP_FILLER
    return out


def positions_of(sym: np.ndarray) -> np.ndarray:
    sym = np.asarray(sym, dtype=np.int64)
    final = sym != GAP_FILLER
    step = np.where(final, sym + 1, GAP_FILLER)
    return (np.cumsum(step) - 1)[final]


def encode_index(mask: np.ndarray, coder: str = "huffman") -> tuple[bytes, dict]:
    """Positions of the nonzeros of a flat boolean mask: gap stream, bitmask or (``coder`` other than
    huffman) ANS-coded significance map, the smallest."""
    n = len(mask)
    pos = np.nonzero(mask)[0]
    nnz = int(len(pos))
    gdata, gf = encode_symbols(gaps_of(pos), 256, coder=coder)
    cands = []
    if check_coder(coder) != "context":
        cands.append((np.packbits(mask.astype(np.uint8)).tobytes(), {"index": "bitmask", "nnz": nnz, "n": n}))
    cands.append((gdata, {"index": "gaps", "nnz": nnz, "stream": gf}))
    if n and _ans_tried(coder, n):
        sdata, sf = encode_symbols(mask.astype(np.int64), 2, coder="context")
        cands.append((sdata, {"index": "sig", "nnz": nnz, "stream": sf}))
    return min(cands, key=lambda c: len(c[0]))  # the first of the smallest: bitmask on a tie, as ever


def decode_index(data: bytes | memoryview, f: dict, n: int, budget: Budget = UNLIMITED) -> np.ndarray:
    """-> flat boolean mask of length n."""
    nnz = _int(f, "nnz", 0, n)
    budget.spend(elements=n // 8, work=n // 8)
    if f.get("index") == "bitmask":
        if len(data) != (n + 7) // 8:
            raise ValueError("bitmask has the wrong length")
        mask = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:n].astype(bool)
    elif f.get("index") == "sig":
        sf = f.get("stream")
        if not isinstance(sf, dict) or sf.get("alpha") != 2 or sf.get("count") != n or sf.get("coding") != "ans":
            raise ValueError("significance map fields missing or wrong")
        mask = decode_symbols(data, sf, max_count=n, budget=budget).astype(bool)
    elif f.get("index") == "gaps":
        sf = f.get("stream")
        if not isinstance(sf, dict) or sf.get("alpha") != GAP_FILLER + 1:
            raise ValueError("gap stream fields missing or of the wrong alphabet")
        sym = decode_symbols(data, sf, max_count=n + n // GAP_FILLER + 1, budget=budget)
        if len(sym) and sym[-1] == GAP_FILLER:  # a filler is always followed by the gap's remainder
            raise ValueError("gap stream ends in a filler")
        pos = positions_of(sym)
        if len(pos) and (pos[-1] >= n):
            raise ValueError("index points past the tensor")
        mask = np.zeros(n, dtype=bool)
        mask[pos] = True
    else:
        raise ValueError("unknown index coding")
    if int(mask.sum()) != nnz:
        raise ValueError("index does not hold the declared number of nonzeros")
    return mask
