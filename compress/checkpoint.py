"""Stopping and resuming a pipeline: Ctrl-C that never lands half way through bookkeeping, a time budget,
and the checkpoint folder that ``--resume`` goes on from."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import torch.nn as nn

from .recipe import Recipe


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
    every record and number so far, and a fingerprint of the run's settings) and the models it needs, as
    files compress writes and loads without trust. Written after each decided candidate, state last, each
    file atomically; removed when the run ends.

    Args:
        folder: where it lives (the CLI: ``OUTPUT.resume``).
        load: ``path -> model`` (the user's ``--arch`` for their own classes).
    """

    def __init__(self, folder, load: Callable | None = None):
        from pathlib import Path

        from .formats import load_model

        self.folder = Path(folder)
        self.load = load or load_model

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def write(self, state: dict, models: dict[str, nn.Module | None]) -> None:
        import json

        from .fileio import write_text
        from .formats import save_model

        self.folder.mkdir(parents=True, exist_ok=True)
        self.writes = getattr(self, "writes", 0) + 1
        names = {}
        for key, m in models.items():  # new names each time: the state on disk always names complete files
            if m is not None:
                name = f"{key}-{self.writes}.pt"
                save_model(m, self.folder / name, force=True)
                names[key] = name
        write_text(self.folder / "state.json", json.dumps({**state, "models": names}), force=True)
        for f in self.folder.glob("*.pt"):  # then the files the state no longer names
            if f.name not in names.values():
                f.unlink(missing_ok=True)

    def read(self, fingerprint: str) -> tuple[dict, dict[str, nn.Module]]:
        import json

        from .errors import InputError

        try:
            state = json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.folder}: no readable checkpoint ({e})") from e
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            raise InputError(f"{self.folder}: this checkpoint was written by a run with other settings (model, data, "
                             "recipe, budget or confidence); run without --resume and with --force to start over")
        models = {}
        for key, name in dict(state.get("models", {})).items():
            if not (isinstance(name, str) and name.startswith(f"{key}-") and name.endswith(".pt")
                    and name[len(key) + 1:-3].isdigit()):
                raise InputError(f"{self.folder}: checkpoint names a model file {name!r}")
            models[key] = self.load(self.folder / name)
        self.writes = max([int(n[len(k) + 1:-3]) for k, n in state["models"].items()], default=0)
        return state, models

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


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
