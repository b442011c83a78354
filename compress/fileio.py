"""Writing files safely: atomic (temporary file + rename), never over an existing file unless told.

Under torchrun only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError, OutputExistsError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    from . import distributed

    path = Path(path)
    if not distributed.is_main():  # under torchrun only rank 0 writes (and checks) files
        with tempfile.TemporaryDirectory() as d:
            yield Path(d) / path.name
        return
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    if path.exists() and path.is_dir():
        raise OutputExistsError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes, force: bool = False) -> None:
    with atomic_write(path, force) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str, force: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), force)
