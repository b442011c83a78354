"""Stopping and resuming a pipeline: Ctrl-C that never lands half way through bookkeeping, a time budget,
and the checkpoint folder that ``--resume`` goes on from -- a folder whose files are read back as hostile
input (see ``Checkpoint``)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from .errors import InputError, first_line, safe
from .recipe import Recipe

STATE = "state.json"
MANIFEST = "compress-checkpoint.json"  # compress's mark on the folder: the files it wrote there
MAX_STATE_BYTES = 4 << 20  # a real state is a few kB per stage: records, timeline rows, per-layer bytes
MAX_MANIFEST_BYTES = 1 << 20
MAX_LISTED = 10_000  # names in the manifest
MAX_BYTES = 1 << 53  # any byte count, parameter, nonzero or MAC count (exact in a JSON double)
MAX_SCORE = 1e12  # |accuracy|, |drop|, standard error, seconds: finite and at most this
MAX_TEXT = 2000  # characters of a verdict or a note
MAX_LAYERS = 100_000  # per-layer byte counts of one size record
_FORMAT, _VERSION = "compress checkpoint", 1
# the only model file names compress writes: KEY-N.pt, ASCII digits, no leading zero
_MODEL_NAME = re.compile(r"(model|kept|current|snapshot(?:0|[1-9][0-9]{0,3}))-([1-9][0-9]{0,8})\.pt")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class Stop:
    """Why the search ended early, if it did: Ctrl-C, or the time budget (checked between candidates)."""

    deadline: float | None = None
    reason: str | None = None
    in_candidate: bool = False  # a Ctrl-C now drops the candidate in progress; at any other moment it waits

    def check(self) -> bool:
        if self.reason is None and self.deadline is not None and time.perf_counter() > self.deadline:
            self.reason = "time budget"
        return self.reason is not None


@contextlib.contextmanager
def ctrl_c(stop: Stop):
    """Ctrl-C while a candidate trains interrupts it (KeyboardInterrupt); at any other moment (bookkeeping,
    checkpointing, measuring) it only marks the run as stopped, so the search ends at its next check with
    everything it holds written -- never half way through saving or printing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stop.reason = stop.reason or "interrupted"
        if stop.in_candidate:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class Checkpoint:
    """A folder that lets a stopped pipeline go on where it was (``--resume``): ``state.json`` (how far it got,
    every record and number so far, and a fingerprint of the run's settings), the models it needs, and its
    manifest ``compress-checkpoint.json`` (the files compress wrote there). Written after each decided
    candidate, state last, each file atomically; removed when the run ends.

    The folder is a trust boundary. It must be a real folder (not a link) that holds the manifest: compress
    neither reads, writes nor deletes in any other. ``state.json`` is read bounded and checked field by field
    against the run's recipe (``check_state``); a model file it names is a plain name of the pattern compress
    writes, listed in the manifest, a regular file (not a link), and loaded without trust -- ``--trust-pickle``
    covers the user's model, never this folder. compress deletes only files its manifest lists, and the
    folder only when that leaves it empty.

    Args:
        folder: where it lives (the CLI: ``OUTPUT.resume``).
        arch: the user's ``--arch``, which rebuilds their own classes (never a pickle's code).
    """

    def __init__(self, folder: str | os.PathLike, arch: str | None = None):
        self.folder = Path(folder)
        self.arch = arch
        self.writes = 0  # the number in the model files' names: new names each write

    def check(self) -> None:
        """Refuse now a folder compress may not use: a link, not a folder, or one without its manifest."""
        self._listed()

    def exists(self) -> bool:
        """Whether the folder holds a checkpoint to go on from (refusing a folder compress may not use)."""
        files = self._listed()
        return files is not None and STATE in files and os.path.lexists(self.folder / STATE)

    def write(self, state: dict, models: dict[str, nn.Module | None]) -> None:
        """Save ``state`` and ``models`` (by key; None: none) under new names, then delete the files of the
        write before. Makes the folder, with its manifest, if there is none; refuses one compress may not use."""
        import json

        from .fileio import write_text
        from .formats import save_model

        old = self._listed()
        if old is None:
            try:
                self.folder.mkdir(parents=True)
            except FileExistsError:
                raise InputError(f"{self.folder} was created by someone else meanwhile; not used") from None
            old = set()
            self._list(old)
        self.writes += 1
        present = {key: m for key, m in models.items() if m is not None}
        names = {key: f"{key}-{self.writes}.pt" for key in present}
        keep = {*names.values(), STATE}
        self._list(old | keep)  # listed before they exist: whatever a crash leaves, compress may delete
        for key, m in present.items():  # new names each time: the state on disk always names complete files
            save_model(m, self.folder / names[key], force=True)
        write_text(self.folder / STATE, json.dumps({**state, "models": names}), force=True)
        self._delete(old - keep)  # then the files the state no longer names
        self._list(keep)

    def read(self, fingerprint: str, plan: Sequence[StagePlan], test: bool = False) -> tuple[dict, dict[str, nn.Module]]:
        """The saved state (checked by ``check_state`` against ``plan``) and its models, loaded without trust.
        ``test``: the run measures test data (every timeline row then has its test accuracy)."""
        from .formats import load_model

        files = self._listed()
        if files is None or STATE not in files:
            raise InputError(f"{self.folder}: no checkpoint to go on from")
        try:
            doc = _parse(_read_plain(self.folder / STATE, MAX_STATE_BYTES))
        except (FileNotFoundError, InputError) as e:
            raise InputError(f"{self.folder / STATE}: no readable checkpoint ({first_line(e)})") from None
        if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
            raise InputError(f"{self.folder}: this checkpoint was written by a run with other settings (model, data, "
                             "recipe, budget or confidence); run without --resume and with --force to start over")
        try:
            state = check_state(doc, plan, test)
        except InputError as e:
            raise InputError(f"{self.folder / STATE}: {e}") from None
        models = {}
        for key, name in state["models"].items():
            path = self.folder / name
            if name not in files:
                raise InputError(f"{path}: not a file of this checkpoint's manifest; not loaded")
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                raise InputError(f"{path}: the checkpoint's model file is missing") from None
            if not stat.S_ISREG(mode):
                raise InputError(f"{path}: not a regular file (a link, a folder, ...); not loaded")
            models[key] = load_model(path, arch=self.arch, trust_pickle=False)  # compress's own file: no trust
        self.writes = int(state["models"]["model"].rpartition("-")[2][:-3])  # KEY-N.pt, checked: N goes on
        return state, models

    def clear(self) -> None:
        """Delete the files the manifest lists (a fresh run over a finished or abandoned checkpoint); the
        folder and its manifest stay."""
        files = self._listed()
        if files is not None:
            self._delete(files)
            self._list(set())
            self.writes = 0

    def remove(self) -> None:
        """Delete the files the manifest lists, then the manifest, then the folder if that left it empty."""
        files = self._listed()
        if files is None:
            return
        self._delete(files | {MANIFEST})
        with contextlib.suppress(OSError):  # not empty: someone else's files stay where they are
            self.folder.rmdir()

    def _listed(self) -> set[str] | None:
        """The files compress wrote in the folder, as its manifest lists them; None when there is no folder.
        A link, a non-folder, a folder without the manifest or a manifest out of shape is refused."""
        try:
            mode = os.lstat(self.folder).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            raise InputError(f"{self.folder} is a symbolic link; a checkpoint folder is a real folder compress made, "
                             "and compress does not follow the link (remove it, or choose another -o)")
        if not stat.S_ISDIR(mode):
            raise InputError(f"{self.folder} is not a folder (remove it, or choose another -o)")
        path = self.folder / MANIFEST
        try:
            doc = _parse(_read_plain(path, MAX_MANIFEST_BYTES))
        except FileNotFoundError:
            raise InputError(f"{self.folder} was not made by compress (it has no {MANIFEST}); compress neither "
                             "reads, writes nor deletes in it: move it away, or choose another -o") from None
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        ok = isinstance(doc, dict) and set(doc) == {"format", "version", "files"} and \
            doc["format"] == _FORMAT and type(doc["version"]) is int and doc["version"] == _VERSION and isinstance(doc["files"], list) and \
            len(doc["files"]) <= MAX_LISTED and all(isinstance(n, str) and (n == STATE or _MODEL_NAME.fullmatch(n))
                                                    for n in doc["files"])
        if not ok:
            raise InputError(f"{path}: not a manifest compress writes (format, version, files: plain names of "
                             "its own files); the folder is not used")
        return set(doc["files"])

    def _list(self, files: set[str]) -> None:
        import json

        from .fileio import write_text

        write_text(self.folder / MANIFEST, json.dumps({"format": _FORMAT, "version": _VERSION,
                                                       "files": sorted(files)}), force=True)

    def _delete(self, names: set[str]) -> None:
        for name in names:  # plain names (the manifest's check): never a path out of the folder
            with contextlib.suppress(OSError):  # gone, a folder, not ours to change: left as it is
                (self.folder / name).unlink()  # a link is removed, never what it points to


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
    for i, r in enumerate(_list(d["results"], "results", stage, stage)):
        _result(r, plan[i], f"results[{i}]")
    for i, row in enumerate(_list(d["timeline"], "timeline", stage + 1, stage + 1)):
        _row(row, f"timeline[{i}]", ("dense fp32",) if i == 0 else plan[i - 1].labels, test)
    if d["measured"] is not None:
        sizes, acc = _list(d["measured"], "measured", 2, 2)
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
        m = _MODEL_NAME.fullmatch(name) if isinstance(name, str) else None
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
    tried = _list(d["tried"], f"{where}.tried", 0, nxt)
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
    tried = _list(d["tried"], f"{where}.tried", 0, len(plan.candidates))
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


def _list(v: Any, where: str, lo: int, hi: int) -> list:
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
    """``a`` (from the file) equals ``b`` (the recipe's), type for type (``true`` is not 1, nor 1 the same as 1.0). Recursion
    follows ``b``, whose depth compress chose."""
    if type(a) is not type(b):
        return False
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(v: Any) -> str:
    """A value from the file, fit for an error message (a container by its type: its repr may not be bounded)."""
    if isinstance(v, (dict, list)):
        return f"an {'object' if isinstance(v, dict) else 'array'}"
    return safe(v)


def _off(where: str, what: str) -> InputError:
    return InputError(f"{where}: {what}")


def _read_plain(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, a regular file (a link is not followed) of at most ``limit`` bytes; read no further.
    FileNotFoundError when it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: a link
        raise InputError(f"not a regular file, or not readable ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError("not a regular file")
        if st.st_size > limit:
            raise InputError(f"{st.st_size:,} bytes, over the {limit:,} a checkpoint's file may hold")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"over the {limit:,} bytes a checkpoint's file may hold")
    return data


def _parse(data: bytes) -> Any:
    import json

    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise InputError(f"not JSON ({first_line(e, 80)})") from None


def fingerprint(model: nn.Module, recipe: Recipe, budget: float, z: float, train, val) -> str:
    """What a checkpoint must agree with to be resumed: the input model's weights, the data, the recipe."""
    import hashlib
    import json

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([recipe.to_dict(), budget, z, train.name, len(train), val.name, len(val)],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()
