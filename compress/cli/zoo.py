"""``compress zoo list`` and ``compress zoo train``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from compress.cli.app import app
from compress.cli.common import out, table
from compress.cli.options import Command, ForceOpt, Group, OutOpt, SeedOpt, TestDataOpt


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


zoo = typer.Typer(cls=Group, help="The model zoo: list and train reference models.", no_args_is_help=True)
app.add_typer(zoo, name="zoo")


@zoo.command("list", cls=Command)
def list_cmd():
    """List the zoo's models."""
    from compress.models import list_models, model_doc

    out.print(table("zoo", ["name", "description"], [[n, model_doc(n)] for n in list_models()]))


@zoo.command(cls=Command)
def train(
    name: Annotated[str, typer.Argument(help="Zoo model name (see `compress zoo list`).")],
    output: OutOpt,
    data: Annotated[
        str,
        typer.Option(
            "--train-data", help="Training data spec (see `compress report --help`); --val-fraction of it is held out."
        ),
    ] = "mnist5k",
    epochs: Annotated[float, typer.Option("--epochs", min=0, help="Training epochs.")] = 3,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine decay).")] = 1e-3,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer", help="Optimizer.")] = Optimizer.adam,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per step.")] = 64,
    width: Annotated[
        float, typer.Option("--width", min=0.01, max=64.0, help="Width multiplier (ResNet, VGG, MobileNet).")
    ] = 1.0,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            min=0.01,
            max=0.9,
            help="Held out for validation (use the same in `compress pipeline` recipes).",
        ),
    ] = 0.2,
    augment: Annotated[
        int | None,
        typer.Option(
            "--augment", help="Random shifts of up to N pixels (default: 2 for images of 24 px or more, else 0)."
        ),
    ] = None,
    test_data: TestDataOpt = None,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
):
    """Train a zoo model on a data set (--val-fraction held out for validation) and save it: `compress train
    --arch zoo:NAME` with the zoo's defaults (Adam, lr 1e-3, 3 epochs).

    Examples:

        compress zoo train lenet5 --epochs 3 -o lenet5.pt

        compress zoo train resnet20 --train-data "mnist5k?size=32" --width 0.5 -o resnet20.pt
    """
    from compress.cli.options import DataOptions, ModelOptions, OutputOptions
    from compress.cli.train_cmd import run_train

    run_train(
        None, ModelOptions(arch=f"zoo:{name}"), DataOptions(train_data=data, test_data=test_data),
        OutputOptions(output=output, force=force), method=None, epochs=epochs, lr=lr, optimizer=optimizer.value,
        batch_size=batch_size, augment=augment, seed=seed, weight_decay=0.0, width=width, val_fraction=val_fraction,
    )  # fmt: skip
