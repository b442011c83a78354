"""The Typer app every command registers with, and the root options (``--debug``, ``--device`` ...).

Command modules import ``app`` from here; ``compress.cli`` imports the command modules and runs the app.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from compress.cli.common import err, out, state
from compress.cli.options import Group

GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--verbose", "-v")  # accepted before or after the command

app = typer.Typer(
    name="compress",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Make trained PyTorch CNNs smaller and faster, and prove it with numbers.",
)


def _version(value: bool) -> None:
    if value:
        from compress import __version__

        print(f"compress {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks for errors (anywhere on the line)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Log what the library does."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", metavar="", help="Only results and errors: no progress, notes or 'wrote' lines."
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="cpu, cuda or cuda:N for training and evaluation. "
        "Under `torchrun --nproc-per-node N compress ...` fine-tuning runs on N "
        "processes.",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, metavar="", help="Show the version and exit."
    ),
):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from compress.errors import UsageError

    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device here")
    from compress import progress

    err.quiet = quiet  # set on every invocation: main() may be called again in one process
    progress.PROGRESS = False if quiet else None
    state["device"] = device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not under torchrun: torch is imported by the command
        return
    from compress import distributed

    if distributed.init_from_env(device):
        if device.startswith("cuda"):
            state["device"] = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        if not distributed.is_main():  # one set of tables and messages: rank 0's
            out.quiet = err.quiet = True
