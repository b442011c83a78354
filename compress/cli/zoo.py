"""``compress zoo list`` and ``compress zoo train``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from compress.cli.app import app
from compress.cli.common import err, make_config, out, table
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
    """Train a zoo model on a data set (--val-fraction held out for validation) and save it.

    Examples:

        compress zoo train lenet5 --epochs 3 -o lenet5.pt

        compress zoo train resnet20 --train-data "mnist5k?size=32" --width 0.5 -o resnet20.pt
    """
    import torch

    from compress import data as data_mod
    from compress.cli.harness import check_output
    from compress.config import FineTune
    from compress.counting import count_params
    from compress.meta import set_meta
    from compress.model_io import save_model
    from compress.models import create_model
    from compress.scoring import evaluate
    from compress.train import fit

    check_output("", output, force)  # fail on an existing output before training, not after
    ds = data_mod.load(data)
    shape = ds.sample_shape
    if augment is None:
        augment = 2 if len(shape) == 3 and min(shape[-2:]) >= 24 else 0
    cfg = make_config(
        FineTune, epochs=epochs, lr=lr, optimizer=optimizer.value, batch_size=batch_size, seed=seed, augment=augment
    )
    tr, va = data_mod.split(ds, val_fraction, seed=0)
    torch.manual_seed(seed)
    kw = {"width": width} if width != 1.0 else {}
    if name.startswith("lenet"):
        kw["input_size"] = shape[-1]
    model = create_model(name, num_classes=ds.num_classes, in_channels=shape[0], **kw)
    from compress.data import check_fits

    check_fits(model, tr)
    err.print(f"training {name} ({count_params(model):,} params) on {len(tr):,} samples of {data}")
    fit(model, tr, cfg, desc=f"train {name}")
    acc = evaluate(model, va)
    row = [["validation accuracy %", acc]]
    meta = {
        "input_shape": [1, *shape],
        "train_data": data,
        "val_accuracy": round(acc, 3),
        "val_fraction": val_fraction,
        "augment": augment,
    }
    if test_data:
        meta["test_accuracy"] = round(evaluate(model, data_mod.load(test_data)), 3)
        row.append(["test accuracy %", meta["test_accuracy"]])
    set_meta(model, **meta)
    save_model(model, output, force=force)
    out.print(table(f"{name} -> {output}", ["", "value"], [["params", count_params(model)], *row]))
