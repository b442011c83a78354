"""Stopping and resuming a pipeline: Ctrl-C that never lands half way through bookkeeping, a time budget,
and the checkpoint folder that ``--resume`` goes on from -- a folder whose files are read back as hostile
input (see ``Checkpoint``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from compress.checkpoint_state import MODEL_NAME, StagePlan, check_state
from compress.errors import InputError, first_line
from compress.filesystem import write_text
from compress.model_io import load_model, save_model
from compress.recipe import Recipe

STATE = "state.json"
MANIFEST = "compress-checkpoint.json"  # compress's mark on the folder: the files it wrote there
MAX_STATE_BYTES = 4 << 20  # a real state is a few kB per stage: records, timeline rows, per-layer bytes
MAX_MANIFEST_BYTES = 1 << 20
MAX_LISTED = 10_000  # names in the manifest
_FORMAT, _VERSION = "compress checkpoint", 1


@dataclasses.dataclass
class Stop:
    """Why the search ended early, if it did: Ctrl-C, or the time budget (checked between candidates and, through
    ``progress.stop_when``, at every step of a candidate's work). ``deadline`` is a reading of ``clock``."""

    deadline: float | None = None
    reason: str | None = None
    in_candidate: bool = False  # a Ctrl-C now drops the candidate in progress; at any other moment it waits
    clock: Callable[[], float] = time.perf_counter

    def check(self) -> bool:
        if self.reason is None and self.deadline is not None and self.clock() > self.deadline:
            self.reason = "time budget"
        return self.reason is not None

    def left(self) -> float | None:
        """Seconds of the time budget left (0 once spent), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - self.clock())


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

        old = self._listed()
        if old is None:
            try:
                self.folder.mkdir(parents=True)
            except FileExistsError:
                raise InputError(f"{self.folder} was created by someone else meanwhile; not used") from None
            old = set()
            self.bounded_list(old)
        self.writes += 1
        present = {key: m for key, m in models.items() if m is not None}
        names = {key: f"{key}-{self.writes}.pt" for key in present}
        keep = {*names.values(), STATE}
        self.bounded_list(old | keep)  # listed before they exist: whatever a crash leaves, compress may delete
        for key, m in present.items():  # new names each time: the state on disk always names complete files
            save_model(m, self.folder / names[key], force=True)
        write_text(self.folder / STATE, json.dumps({**state, "models": names}), force=True)
        self._delete(old - keep)  # then the files the state no longer names
        self.bounded_list(keep)

    def read(
        self, fingerprint: str, plan: Sequence[StagePlan], test: bool = False
    ) -> tuple[dict, dict[str, nn.Module]]:
        """The saved state (checked by ``check_state`` against ``plan``) and its models, loaded without trust.
        ``test``: the run measures test data (every timeline row then has its test accuracy)."""
        files = self._listed()
        if files is None or STATE not in files:
            raise InputError(f"{self.folder}: no checkpoint to go on from")
        try:
            doc = _parse(_read_plain(self.folder / STATE, MAX_STATE_BYTES))
        except (FileNotFoundError, InputError) as e:
            raise InputError(f"{self.folder / STATE}: no readable checkpoint ({first_line(e)})") from None
        if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint:
            raise InputError(
                f"{self.folder}: this checkpoint was written by a run with other settings (model, data, "
                "recipe, budget or confidence); run without --resume and with --force to start over"
            )
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
            self.bounded_list(set())
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
            raise InputError(
                f"{self.folder} is a symbolic link; a checkpoint folder is a real folder compress made, "
                "and compress does not follow the link (remove it, or choose another -o)"
            )
        if not stat.S_ISDIR(mode):
            raise InputError(f"{self.folder} is not a folder (remove it, or choose another -o)")
        path = self.folder / MANIFEST
        try:
            doc = _parse(_read_plain(path, MAX_MANIFEST_BYTES))
        except FileNotFoundError:
            raise InputError(
                f"{self.folder} was not made by compress (it has no {MANIFEST}); compress neither "
                "reads, writes nor deletes in it: move it away, or choose another -o"
            ) from None
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
        ok = (
            isinstance(doc, dict)
            and set(doc) == {"format", "version", "files"}
            and doc["format"] == _FORMAT
            and type(doc["version"]) is int
            and doc["version"] == _VERSION
            and isinstance(doc["files"], list)
            and len(doc["files"]) <= MAX_LISTED
            and all(isinstance(n, str) and (n == STATE or MODEL_NAME.fullmatch(n)) for n in doc["files"])
        )
        if not ok:
            raise InputError(
                f"{path}: not a manifest compress writes (format, version, files: plain names of "
                "its own files); the folder is not used"
            )
        return set(doc["files"])

    def bounded_list(self, files: set[str]) -> None:
        import json

        write_text(
            self.folder / MANIFEST,
            json.dumps({"format": _FORMAT, "version": _VERSION, "files": sorted(files)}),
            force=True,
        )

    def _delete(self, names: set[str]) -> None:
        for name in names:  # plain names (the manifest's check): never a path out of the folder
            with contextlib.suppress(OSError):  # gone, a folder, not ours to change: left as it is
                (self.folder / name).unlink()  # a link is removed, never what it points to


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
    h.update(
        json.dumps(
            [recipe.to_dict(), budget, z, train.name, len(train), val.name, len(val)], sort_keys=True, default=str
        ).encode()
    )
    return h.hexdigest()
