"""Importable helpers for tests (data callables, architectures)."""
import numpy as np


def tiny_data():
    rng = np.random.default_rng(0)
    return rng.random((20, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 20)


def one_line_error(res):
    """The CLI's contract for bad input: non-zero exit, one line on stderr, no traceback."""
    lines = [ln for ln in res.err.strip().splitlines() if ln.strip()]
    return res.code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.err
