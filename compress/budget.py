"""What one call of a model read from a file may cost: the floor any file may ask for, the cap no file may
pass, and the factor a user sets for a file they trust (``COMPRESS_MAX_GRAPH_COST``). A leaf: the stored
graph's check (``coding.graph_model``) and the INT8 file (``quantize.int8_file``) both charge against it."""

from __future__ import annotations

import math
import os

from compress.errors import UsageError, safe

MAX_INPUT_VALUES = 1 << 24  # values per sample of any input shape (16.7 M: a 3 x 2,364 x 2,364 image)
WORK_FLOOR, BYTES_FLOOR = 1 << 32, 1 << 28  # any graph may ask for this much (4.3e9 operations, 256 MiB)
WORK_CAP, BYTES_CAP = 1 << 39, 1 << 30  # and no call of one for more (5.5e11 operations, 1 GiB)


def env_number(name: str, default: float) -> float:
    """The positive number an environment variable sets (``default`` when unset): the user's word that a file
    they trust may cost more. Anything else is a UsageError, one line."""
    raw = os.environ.get(name)
    if raw is None:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name}={safe(raw)} must be a positive number (default {default:g})")
    return value


def cost_factor() -> float:
    """``COMPRESS_MAX_GRAPH_COST``: what every cost limit of a file is multiplied by (a file you trust)."""
    return env_number("COMPRESS_MAX_GRAPH_COST", 1)


def call_limits() -> tuple[float, float]:
    """(operations, bytes) that one call of a model read from a file may take at most."""
    return cost_factor() * WORK_CAP, cost_factor() * BYTES_CAP


def justified(weights: int, weight_bytes: int, input_values: int, input_bytes: int) -> tuple[int, int]:
    """(operations, bytes) one sample of a model read from a file may ask for, for what its weights and input
    are: a CNN does a few thousand operations per weight; its activations are some dozens of copies of its
    input, or twice its weights."""
    return 4096 * (weights + input_values), max(128 * input_bytes, 2 * weight_bytes)


def limits(per_sample: tuple[int, int], batch: int) -> tuple[float, float]:
    """(operations, bytes) one call on ``batch`` samples may take: ``per_sample`` (``justified``) times the
    batch, at least the floor, at most the cap, all times ``cost_factor()``."""
    f = cost_factor()
    return (
        f * min(WORK_CAP, max(WORK_FLOOR, batch * per_sample[0])),
        f * min(BYTES_CAP, max(BYTES_FLOOR, batch * per_sample[1])),
    )
