"""Progress bars on stderr (rich) for long work: training, sensitivity scans, calibration -- and the points
where that work may be stopped.

Shown on a terminal, on rank 0 only; ``COMPRESS_PROGRESS=0/1`` forces them off/on and the CLI's
``--quiet`` turns them off (``PROGRESS = False``).

Every unit of progress (``Bar.update``: a training step, one trial of a scan) is also a stop point: inside
``stop_when(check)`` it raises ``Stopped`` -- a ``KeyboardInterrupt``, so it ends the work the way Ctrl-C does --
as soon as ``check()`` is true. The pipeline's time budget ends a candidate in progress this way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Callable, Iterator

PROGRESS: bool | None = None  # the CLI's --quiet sets False; None: decide as below
# set by stop_when; per thread (a pipeline in one thread never stops another's work)
_stop_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("stop_check", default=None)


class Stopped(KeyboardInterrupt):
    """Long work ended at a stop point because its ``stop_when`` check said so (as Ctrl-C ends it)."""


@contextlib.contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within this block, the work's next stop point raises ``Stopped`` once ``check()`` is true."""
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


def stop_point() -> None:
    """Raise ``Stopped`` if the ``stop_when`` check in force says so; else nothing (and nothing outside one)."""
    check = _stop_check.get()
    if check is not None and check():
        raise Stopped


def progress_enabled() -> bool:
    """Progress bars on a terminal; COMPRESS_PROGRESS=0/1 forces them off/on."""
    if PROGRESS is not None:
        return PROGRESS
    env = os.environ.get("COMPRESS_PROGRESS")
    return env == "1" if env in ("0", "1") else sys.stderr.isatty()


class Bar:
    """A rich progress bar on stderr (rank 0, terminal or COMPRESS_PROGRESS=1), or nothing."""

    def __init__(self, show: bool, total: int, desc: str):
        self.bar = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(desc, total=total, info="")

    def update(self, info: str) -> None:
        """One unit of work done, and a stop point (``stop_when``), shown or not."""
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        stop_point()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
