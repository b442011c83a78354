"""Writing files safely.

* Atomic: the bytes go to a temporary file beside the target, which then takes the target's name.
* Never over an existing file unless told (``force``), and even then only over a regular file (a
  device node, a folder or a fifo is never replaced). Without ``force`` the final step is a hard
  link, which fails if another process created the name meanwhile: of two concurrent writers to the
  same new name, one wins and the other gets an error.
* The new file's mode follows the umask (0644 under umask 022); a replaced file keeps its mode.
* Temporary files are named ``.compress-tmp-PID-...``; one left by a killed process (its PID gone)
  is removed the next time compress writes into that folder.

Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from compress.errors import InputError, OutputExistsError, param, safe

TMP_PREFIX = ".compress-tmp-"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _existing_mode(path: Path, force: bool) -> int | None:
    """The mode of the file that ``path`` replaces, None if it is new; refuse what may not be replaced."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not force:
        raise OutputExistsError(f"{path} exists; pass {param('force')} to overwrite it")
    if stat.S_ISDIR(st.st_mode):
        raise OutputExistsError(f"{path} is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise OutputExistsError(f"{path} is not a regular file; compress only replaces regular files")
    return stat.S_IMODE(st.st_mode)


def _is_main() -> bool:
    """Rank 0 of a torch process group, or no group: a process that has not imported torch has none (and a
    write of its own need not import torch to know it: 2.5 s)."""
    if "torch" not in sys.modules:
        return True
    from compress import distributed

    return distributed.is_main()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it takes ``path``'s name only on success."""
    path = Path(path)
    if not _is_main():  # under torchrun only rank 0 writes (and checks) files
        with tempfile.TemporaryDirectory() as d:
            yield Path(d) / path.name
        return
    mode = _existing_mode(path, force)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist")
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=f"-{path.name}", dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode if mode is not None else _umask_mode())
        if force:
            _existing_mode(path, force)  # still a regular file (or gone) at the last moment
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name exists: never a silent replacement
            except FileExistsError as e:
                raise OutputExistsError(
                    f"{path} was created by someone else meanwhile; pass {param('force')} to overwrite it"
                ) from e
            except OSError:  # a file system without hard links
                if path.exists():
                    raise OutputExistsError(f"{path} exists; pass {param('force')} to overwrite it") from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path, data: bytes, force: bool = False) -> None:
    with atomic_write(path, force) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str, force: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), force)


# ----------------------------------------------------------------------------- reading
_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a link"),
)


def not_regular(mode: int) -> str | None:
    """What a file of this mode is, when it is not a regular file (None when it is)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path, follow: bool = True) -> IO[bytes]:
    """``path`` opened for reading, if it is a regular file: refused from ``stat`` before the open, and from
    ``fstat`` after an open that never blocks (a FIFO swapped in between opens at once and is refused).
    ``follow=False``: a link in the last place is refused too (a path already resolved inside its folder)."""
    extra = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        kind = not_regular(os.stat(path, follow_symlinks=follow).st_mode)
        if kind is not None:
            raise InputError(f"{safe(str(path), 200)} is {kind}, not a regular file")
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | extra))
    except OSError as e:
        raise InputError(f"cannot read {safe(str(path), 200)}: {e.strerror or e}") from None
    kind = not_regular(os.fstat(f.fileno()).st_mode)
    if kind is not None:
        f.close()
        raise InputError(f"{safe(str(path), 200)} is {kind}, not a regular file")
    return f
