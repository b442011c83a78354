"""What `compress pipeline --help` and `compress prune --help` say: the exit statuses, every importance, and no
option text lost to rich's markup (a "[default: ...]" in a help string was read as a style tag and vanished)."""

import re

import typer

from compress.cli.app import app
from compress.prune.importance import IMPORTANCES


def _help(cli, command: str) -> str:
    res = cli(command, "--help")
    assert res.code == 0, res.err
    return " ".join(res.out.replace("│", " ").split())  # one line, without the panel's borders


def test_pipeline_help_lists_the_exit_statuses(cli):
    said = _help(cli, "pipeline")
    for status in (
        "0 finished, OUTPUT written",
        "1 bad input or a failure",
        "2 bad usage",
        "3 stopped by Ctrl-C or --time-budget",
        "4 finished but nothing kept",
        "130 Ctrl-C before or after",
    ):
        assert status in said, status


def test_prune_help_names_every_registered_importance(cli):
    said = _help(cli, "prune")
    prune = typer.main.get_command(app).commands["prune"]
    importance = next(p for p in prune.params if p.opts == ["--importance"])
    assert list(importance.type_descriptor.choices) == list(IMPORTANCES)  # the registry's, in its order
    for name in IMPORTANCES:
        assert re.search(rf"\b{re.escape(name)}\b", said.split("--importance", 1)[1].split("--sensitivity")[0]), name


def test_prune_help_keeps_the_defaults_it_states(cli):
    said = _help(cli, "prune")
    # each method's own, from its config, in the order the methods registered
    assert "(default: threshold 3; l1-filter 0; channel-union 4)" in said
    assert "(default: threshold 0.001; l1-filter 0.001; channel-union 0.02)" in said
    assert "[default: 3]" in said.split("--rounds", 1)[1] and "8 when the model is on a CUDA device, else 1" in said
    assert not re.search(r"\w \.", said)  # no word left before a stray " ." (the issue: "Total fine-tuning epochs .")
