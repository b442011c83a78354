"""The options of prune, quantize and factorize are made from their configs: every config field is an option or
named as left to --set, each option says what it does, and the options are the ones the CLI has always had."""

import dataclasses

import pytest
import typer

from compress.cli import factorize_cmd, prune_cmds, quant_cmds
from compress.cli.app import app
from compress.cli.config_options import HIDDEN, args_doc

SPECS = {"prune": prune_cmds, "quantize": quant_cmds, "factorize": factorize_cmd}
# the options each command had before they were made from the configs; a new config field shows up here
OPTIONS = {
    "prune": {
        "--method",
        "--sparsity",
        "--quality",
        "--allocate",
        "--rounds",
        "--schedule",
        "--ratio",
        "--round-to",
        "--target-macs",
        "--target-params",
        "--target-latency",
        "--importance",
        "--lasso-ratio",
        "--cost-weight",
        "--reconfig-interval",
        "--sensitivity",
        "--budget",
    },
    "quantize": {
        "--activations",
        "--bits",
        "--scheme",
        "--per-tensor",
        "--affine",
        "--rd-lambda",
        "--observer",
        "--engine",
        "--calib-data",
        "--max-accuracy-drop",
        "--max-float-layers",
    },
    "factorize": {"--energy", "--rank-ratio", "--rank"},
}
COMMON = {
    "--output",
    "--force",
    "--json",
    "--report",
    "--threads",
    "--no-latency",
    "--arch",
    "--trust-pickle",
    "--input-shape",
    "--train-data",
    "--val-data",
    "--test-data",
    "--loss",
    "--metric",
    "--workers",
    "--set",
    "--layers",
    "--exclude",
    "--epochs",
    "--lr",
    "--distill",
    "model",
}


def _params(name):
    return typer.main.get_command(app).commands[name].params


@pytest.mark.parametrize("name", SPECS)
def test_every_config_field_is_an_option_or_left_to_set(name):
    spec = SPECS[name].spec()
    hidden = getattr(SPECS[name], "HIDDEN", set())
    for cls in spec.methods.values():
        for f in dataclasses.fields(cls):
            if f.name in ("select", "finetune"):
                part = type(cls.part(f.name))  # Select / FineTune
                names = {f"{f.name}.{p.name}" for p in dataclasses.fields(part)}
                left = {f"{f.name}.{n}" for n in HIDDEN[f.name]}
            else:
                names, left = {f.name}, {f.name} & hidden
            exposed = spec.exposed(cls)
            for n in names:
                assert (n in exposed) != (n in left), f"{cls.__name__}.{n}: make it an option or list it as hidden"
    fields = {f.name for cls in spec.methods.values() for f in dataclasses.fields(cls)}
    assert hidden <= fields, f"hidden names no field: {hidden - fields}"


@pytest.mark.parametrize("name", SPECS)
def test_each_option_has_help_from_its_config(name):
    spec = SPECS[name].spec()
    for o in spec.opts.values():
        cls = next(iter(o.owners.values()))
        doc = args_doc(cls if o.part is None else type(cls.part(o.part)))
        assert o.spec.help or doc.get(o.name), f"{cls.__name__}.{o.name}: no Args: text to show as its help"


@pytest.mark.parametrize("name", SPECS)
def test_the_options_are_the_ones_the_cli_had(name):
    flags = {p.opts[0] for p in _params(name)}
    assert flags == OPTIONS[name] | COMMON


def test_choices_come_from_the_registries():
    from compress.prune import IMPORTANCES
    from compress.quant_state import SCHEMES
    from compress.quantize.int8_stage import ENGINES, OBSERVER_CHOICES

    choices = {p.opts[0]: list(p.type_descriptor.choices or ()) for n in ("prune", "quantize") for p in _params(n)}
    assert choices["--importance"] == list(IMPORTANCES) and "taylor" in choices["--importance"]
    assert choices["--scheme"] == list(SCHEMES) and choices["--observer"] == list(OBSERVER_CHOICES)
    assert choices["--engine"] == list(ENGINES)
    assert set(choices["--method"]) == {"threshold", "l1-filter", "channel-union"}


def test_args_doc_reads_every_field_of_a_config():
    from compress.prune import ThresholdConfig

    doc = args_doc(ThresholdConfig)
    assert doc["allocate"].endswith('Without training data: "std".')  # its last continuation line too
    assert set(doc) == {f.name for f in dataclasses.fields(ThresholdConfig)}
