"""Importable helpers for tests (data callables, architectures)."""

import numpy as np


def tiny_data():
    rng = np.random.default_rng(0)
    return rng.random((20, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 20)


def one_line_error(res):
    """The CLI's contract for bad input: non-zero exit, one line on stderr, no traceback."""
    lines = [ln for ln in res.err.strip().splitlines() if ln.strip()]
    return res.code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.err


def mutated(blob: bytes, data, fourth) -> bytes:
    """``blob`` after 1 to 4 edits that hypothesis draws (``data``): a bit flipped, a run cut, a few bytes
    inserted, or ``fourth(blob, i)`` at a drawn position (a field zeroed, a size set large)."""
    from hypothesis import strategies as st

    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "fourth"]))
        i = data.draw(st.integers(0, len(out) - 1))
        if op == "flip":
            out[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del out[i : i + data.draw(st.integers(1, 64))]
        elif op == "insert":
            out[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            fourth(out, i)
        if len(out) < 2:
            break
    return bytes(out)


class Calls:
    """Counts the Python and C function calls made inside ``with Calls() as c:`` (``c.n``): a measure of work
    that, unlike a clock, does not depend on how fast or how busy the machine is. A refusal that comes before
    the work a file asks for makes a few thousand calls; the work (a loop per declared module, node or
    element) makes as many calls as the file declares."""

    def __init__(self):
        self.n = 0

    def _count(self, frame, event, arg):
        if event in ("call", "c_call"):
            self.n += 1

    def __enter__(self):
        import sys

        self._before = sys.getprofile()
        sys.setprofile(self._count)
        return self

    def __exit__(self, *exc):
        import sys

        sys.setprofile(self._before)
        return False
