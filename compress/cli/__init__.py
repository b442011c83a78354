"""The ``compress`` command line: thin commands over the library.

The Typer app is ``compress.cli.app``; each command module registers its commands with it, and
``compress.cli.runner.main`` runs one command line.
"""

from compress.cli import (  # noqa: F401
    coding_cmds,
    factorize_cmd,
    model_cmds,
    pipeline_cmd,
    prune_cmds,
    quant_cmds,
    train_cmd,
    zoo,
)
from compress.cli.runner import entry, main

__all__ = ["entry", "main"]
