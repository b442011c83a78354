"""Progress bars on stderr (rich) for long work: training, sensitivity scans, calibration.

Shown on a terminal, on rank 0 only; ``COMPRESS_PROGRESS=0/1`` forces them off/on and the CLI's
``--quiet`` turns them off (``PROGRESS = False``).
"""
from __future__ import annotations

import os
import sys

PROGRESS: bool | None = None  # the CLI's --quiet sets False; None: decide as below


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

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(desc, total=total, info="")

    def update(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
