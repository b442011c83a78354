"""The schema of a checkpoint's ``state.json``: every field ``pipeline`` reads back on ``--resume``, checked for
type, range and agreement with the run's recipe before any of it is used (``check_state``). The folder's file
handling is ``checkpoint.Checkpoint``'s."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from compress.errors import InputError, safe

MAX_BYTES = 1 << 53  # any byte count, parameter, nonzero or MAC count (exact in a JSON double)
MAX_SCORE = 1e12  # |accuracy|, |drop|, standard error, seconds: finite and at most this
MAX_TEXT = 2000  # characters of a verdict or a note
MAX_LAYERS = 100_000  # per-layer byte counts of one size record
# the only model file names compress writes: KEY-N.pt, ASCII digits, no leading zero
MODEL_NAME = re.compile(r"(model|kept|current|snapshot(?:0|[1-9][0-9]{0,3}))-([1-9][0-9]{0,8})\.pt")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """What a checkpoint's records of one recipe stage must agree with (``pipeline`` makes it from the recipe).

    Args:
        name: the stage's name.
        search_key: its candidates' search key.
        candidates: each candidate's (searched value, options), as JSON reads them back.
        labels: the stage's timeline label when a candidate was kept, and when none was.
    """

    name: str
    search_key: str
    candidates: tuple[tuple[Any, Any], ...]
    labels: tuple[str, str]


def check_state(doc: Any, plan: Sequence[StagePlan], test: bool = False) -> dict:
    """``doc``, a parsed ``state.json``, checked against the run's recipe (``plan``) before the pipeline reads any
    of it: the keys of every record (none missing, none unknown), each field's type and range, the lengths that
    tie the fields to each other and to the recipe, each record's candidate (the recipe's own, in order), and
    model file names of the one pattern compress writes. ``test``: each timeline row carries a test accuracy.
    Anything off is an InputError naming the field; nothing else is raised."""
    d = _keys(doc, "state", {"fingerprint", "stage", "results", "timeline", "measured", "search", "models"})
    if not (isinstance(d["fingerprint"], str) and _HEX64.fullmatch(d["fingerprint"])):
        raise _off("fingerprint", "not a SHA-256 hex digest")
    stage = _int(d["stage"], "stage", 0, len(plan))
    for i, r in enumerate(bounded_list(d["results"], "results", stage, stage)):
        _result(r, plan[i], f"results[{i}]")
    for i, row in enumerate(bounded_list(d["timeline"], "timeline", stage + 1, stage + 1)):
        _row(row, f"timeline[{i}]", ("dense fp32",) if i == 0 else plan[i - 1].labels, test)
    if d["measured"] is not None:
        sizes, acc = bounded_list(d["measured"], "measured", 2, 2)
        _sizes(sizes, "measured[0]")
        _num(acc, "measured[1]")
    search = d["search"]
    keys = {"model", *(f"snapshot{k}" for k in range(stage + 1))}
    optional = set()
    if search is not None:
        if stage == len(plan):
            raise _off("search", "a search in progress after the recipe's last stage")
        if _search_state(search, plan[stage], "search") is not None:
            keys.add("kept")
        optional.add("current")
    writes = set()
    for key, name in _keys(d["models"], "models", keys, optional).items():
        m = MODEL_NAME.fullmatch(name) if isinstance(name, str) else None
        if m is None or m.group(1) != key:
            raise _off(f"models.{key}", f"{_show(name)} is not a name compress writes ({key}-N.pt)")
        writes.add(m.group(2))
    if len(writes) != 1:
        raise _off("models", "file names of more than one write")
    return d


def _search_state(v: Any, plan: StagePlan, where: str) -> int | None:
    """Check a search in progress; its kept candidate's index."""
    d = _keys(v, where, {"next", "misses", "tried", "kept_index", "kept_sizes"})
    n = len(plan.candidates)
    nxt = _int(d["next"], f"{where}.next", 0, n)
    tried = bounded_list(d["tried"], f"{where}.tried", 0, nxt)
    if len(tried) < nxt < n:  # only the end of a search (patience, first fit) skips candidates
        raise _off(f"{where}.next", f"{nxt} with {len(tried)} candidate(s) tried")
    for j, rec in enumerate(tried):
        _record(rec, plan, j, f"{where}.tried[{j}]", why=True)
    _int(d["misses"], f"{where}.misses", 0, len(tried))
    kept = d["kept_index"]
    if kept is None:
        if d["kept_sizes"] is not None:
            raise _off(f"{where}.kept_sizes", "sizes of no kept candidate")
        return None
    _int(kept, f"{where}.kept_index", 0, len(tried) - 1)
    if tried[kept]["within_budget"] is not True:
        raise _off(f"{where}.kept_index", "names a candidate over budget")
    _sizes(d["kept_sizes"], f"{where}.kept_sizes")
    return kept


def _result(v: Any, plan: StagePlan, where: str) -> None:
    d = _keys(v, where, {"stage", "search_key", "kept", "tried", "bytes", "accuracy", "seconds"})
    if d["stage"] != plan.name or d["search_key"] != plan.search_key:
        raise _off(where, f"not the recipe's stage {plan.name!r} searching {plan.search_key!r}")
    tried = bounded_list(d["tried"], f"{where}.tried", 0, len(plan.candidates))
    for j, rec in enumerate(tried):
        _record(rec, plan, j, f"{where}.tried[{j}]", why=False)
    if d["kept"] is not None and not any(_same(d["kept"], t) and t["within_budget"] is True for t in tried):
        raise _off(f"{where}.kept", "not one of the candidates tried within budget")
    _int(d["bytes"], f"{where}.bytes", 1, MAX_BYTES)
    _num(d["accuracy"], f"{where}.accuracy")
    _num(d["seconds"], f"{where}.seconds", 0.0)


def _record(v: Any, plan: StagePlan, j: int, where: str, why: bool) -> None:
    """A tried candidate's record; ``why`` is still in it while its search is under way."""
    keys = {"value", "options", "accuracy", "drop", "se", "within_budget", "verdict", "bytes"}
    d = _keys(v, where, keys | {"why"} if why else keys)
    value, options = plan.candidates[j]
    if not (_same(d["value"], value) and _same(d["options"], options)):
        raise _off(where, f"not the recipe's candidate {j + 1} of stage {plan.name!r}")
    _num(d["accuracy"], f"{where}.accuracy")
    _num(d["drop"], f"{where}.drop")
    _num(d["se"], f"{where}.se", 0.0)
    if not isinstance(d["within_budget"], bool):
        raise _off(f"{where}.within_budget", "not true or false")
    _int(d["bytes"], f"{where}.bytes", 1, MAX_BYTES)
    for k in ("verdict", "why") if why else ("verdict",):
        _text(d[k], f"{where}.{k}")


def _row(v: Any, where: str, labels: tuple[str, ...], test: bool) -> None:
    """A timeline row: the model after a stage."""
    if isinstance(v, dict) and ("test_accuracy" in v) != test:
        raise _off(where, f"written by a run {'without' if test else 'with'} --test-data; resume with the same data")
    keys = {"stage", "bytes", "accuracy", "params", "nonzeros", "macs"}
    d = _keys(v, where, keys | {"test_accuracy"} if test else keys, {"int8"})
    if not any(_same(d["stage"], label) for label in labels):
        raise _off(f"{where}.stage", f"{_show(d['stage'])} is not one of {', '.join(map(repr, labels))}")
    for k in ("bytes", "params", "nonzeros", "macs"):
        _int(d[k], f"{where}.{k}", 0, MAX_BYTES)
    _num(d["accuracy"], f"{where}.accuracy")
    if test:
        _num(d["test_accuracy"], f"{where}.test_accuracy")
    if "int8" in d and d["int8"] is not True:
        raise _off(f"{where}.int8", "present and not true")


def _sizes(v: Any, where: str) -> None:
    """A model's sizes as ``coding.stats.size_bytes`` measures them."""
    d = _keys(v, where, {"coded", "fixed", "layers", "graph_note"})
    _int(d["coded"], f"{where}.coded", 1, MAX_BYTES)
    _int(d["fixed"], f"{where}.fixed", 1, MAX_BYTES)
    layers = d["layers"]
    if not isinstance(layers, dict) or len(layers) > MAX_LAYERS:
        raise _off(f"{where}.layers", f"not an object of at most {MAX_LAYERS:,} layers")
    for name, n in layers.items():
        if len(name) > MAX_TEXT:
            raise _off(f"{where}.layers", f"a layer name over {MAX_TEXT} characters")
        _int(n, f"{where}.layers[{_show(name)}]", 0, MAX_BYTES)
    if d["graph_note"] is not None and not (isinstance(d["graph_note"], str) and len(d["graph_note"]) <= MAX_TEXT):
        raise _off(f"{where}.graph_note", f"neither null nor a text of at most {MAX_TEXT} characters")


def _keys(v: Any, where: str, required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> dict:
    if not isinstance(v, dict):
        raise _off(where, f"{_show(v)} is not an object")
    missing, unknown = required - v.keys(), v.keys() - required - optional
    if missing:
        raise _off(where, f"missing {', '.join(map(repr, sorted(missing)))}")
    if unknown:
        raise _off(where, f"unknown key {_show(sorted(unknown)[0])}")
    return v


def bounded_list(v: Any, where: str, lo: int, hi: int) -> list:
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        n = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise _off(where, f"{_show(v) if not isinstance(v, list) else f'{len(v)} items'}, not a list of {n} items")
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _off(where, f"{_show(v)} is not a whole number from {lo} to {hi}")
    return v


def _num(v: Any, where: str, lo: float = -MAX_SCORE) -> float:
    if type(v) not in (int, float) or not (math.isfinite(v) and lo <= v <= MAX_SCORE):
        raise _off(where, f"{_show(v)} is not a finite number from {lo:g} to {MAX_SCORE:g}")
    return v


def _text(v: Any, where: str) -> str:
    if not (isinstance(v, str) and len(v) <= MAX_TEXT and v.isprintable()):
        raise _off(where, f"not a printable text of at most {MAX_TEXT} characters")
    return v


def _same(a: Any, b: Any) -> bool:
    """``a`` (from the file) equals ``b`` (the recipe's), type for type (``true`` is not 1, nor 1 the same as 1.0).
    Recursion
    follows ``b``, whose depth compress chose."""
    if type(a) is not type(b):
        return False
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    return a == b


def _show(v: Any) -> str:
    """A value from the file, fit for an error message (a container by its type: its repr may not be bounded)."""
    if isinstance(v, (dict, list)):
        return f"an {'object' if isinstance(v, dict) else 'array'}"
    return safe(v)


def _off(where: str, what: str) -> InputError:
    return InputError(f"{where}: {what}")
