"""``compress train``: train a model from its own initialisation (or given weights), dense or as PruneTrain
(``--method channel-union``), and report what the training cost (``compress.prune.prunetrain``)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from compress.cli.app import app
from compress.cli.common import err, out, table
from compress.cli.options import (
    METHOD,
    TRAINING,
    Command,
    DataOptions,
    ModelOptions,
    OutputOptions,
    SeedOpt,
    ThreadsOpt,
    flag,
    grouped,
    option,
)


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


class TrainMethod(str, Enum):
    channel_union = "channel-union"


def _fraction(name: str):
    return option(
        f"--{name}",
        panel=METHOD,
        help=f"Shrink to this fraction of the starting model's {name[7:]} (in (0, 1]); the pull stops there and "
        "what is left above it when the architecture freezes is removed by L1 ranking.",
    )


ModelPathArg = Annotated[
    str | None,
    typer.Argument(help="Weights to start from (any model file compress reads); default: the --arch's own init.",
                   show_default=False),
]  # fmt: skip


def build_model(model_path: str | None, load: ModelOptions, ds, width: float = 1.0):
    """The model to train: the file's weights, else a fresh ``--arch`` (a zoo one sized to the data)."""
    from compress.errors import UsageError
    from compress.models import create_model
    from compress.torch_files import build_arch

    if model_path:
        if width != 1.0:
            raise UsageError("--width builds a zoo architecture; a model file has its own width")
        return load.load().load(model_path)
    if not load.arch:
        raise UsageError("compress train needs a model: a file to start from, or --arch module:callable|zoo:NAME")
    shape = ds.sample_shape
    if load.arch.startswith("zoo:"):
        name = load.arch[4:]
        kw: dict[str, Any] = {"width": width} if width != 1.0 else {}
        if name.startswith("lenet") and len(shape) == 3:
            kw["input_size"] = shape[-1]
        return create_model(name, num_classes=ds.num_classes, in_channels=shape[0], **kw)
    if width != 1.0:
        raise UsageError("--width builds a zoo architecture (--arch zoo:NAME); your own takes its own arguments")
    return build_arch(load.arch)


def run_train(
    model_path: str | None,
    load: ModelOptions,
    data: DataOptions,
    dest: OutputOptions,
    *,
    method: str | None,
    epochs: float,
    lr: float,
    optimizer: str,
    batch_size: int,
    augment: int | None,
    seed: int,
    weight_decay: float = 1e-4,
    target_macs: float | None = None,
    target_params: float | None = None,
    lasso_ratio: float = 0.8,
    cost_weight: float = 1.0,
    min_channels: int = 2,
    reconfig_every: float = 0.25,
    freeze_last: float = 0.25,
    grow_batch: bool = False,
    max_batch: int | None = None,
    compare_dense: bool = False,
    width: float = 1.0,
    val_fraction: float | None = None,
    threads: int | None = None,
) -> dict:
    """What ``compress train`` and ``compress zoo train`` do; returns the report."""
    import copy

    import torch

    from compress import data as data_mod
    from compress.cli.common import check_reports, emit_json, state, use_threads
    from compress.cli.harness import TaskOptions, check_data, check_output
    from compress.errors import UsageError
    from compress.meta import set_meta
    from compress.model_io import save_model
    from compress.prune.prunetrain import check_settings, train_model
    from compress.scoring import resolve_metric
    from compress.train import resolve_loss

    use_threads(threads)
    check_output(model_path or "", dest.output, dest.force)  # before any work
    check_reports(dest.report, dest.json_out, dest.force)
    if compare_dense and method is None:
        raise UsageError("--compare-dense compares a --method with dense training: give --method channel-union")
    task = TaskOptions(data.loss, data.metric, data.workers, data.val_data)
    loss, metric = resolve_loss(task.loss), resolve_metric(task.metric)
    if not data.train_data:
        raise UsageError("compress train needs --train-data SPEC (e.g. mnist5k)")
    ds = data_mod.load(data.train_data, data.workers)
    if data.val_data:
        tr, va, vf = ds, data_mod.load(data.val_data, data.workers), None
    else:
        vf = val_fraction if val_fraction is not None else data_mod.VAL_FRACTION
        tr, va = data_mod.split(ds, vf, seed=0)
    # what PruneTrain shrinks by: checked here, before any work, and given to train_model
    schedule: dict[str, Any] = dict(
        target_macs=target_macs,
        target_params=target_params,
        freeze_last=freeze_last,
        reconfig_every=reconfig_every,
        grow_batch=grow_batch,
        max_batch=max_batch,
        cost_weight=cost_weight,
        min_channels=min_channels,
    )
    check_settings(method, len(tr), batch_size=batch_size, **schedule)
    torch.manual_seed(seed)  # the model's own init is seeded too
    model = build_model(model_path, load, ds, width).to(state["device"])
    check_data(model, tr, task, metric, training=True)
    check_data(model, va, task, metric)
    test = check_data(model, data_mod.load(data.test_data, data.workers), task, metric) if data.test_data else None
    shape = tr.sample_shape
    name = load.arch or model_path or ""
    if augment is None:
        augment = 2 if len(shape) == 3 and min(shape[-2:]) >= 24 else 0
    kw: dict[str, Any] = dict(
        val=va, test=test, epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, augment=augment,
        seed=seed, weight_decay=weight_decay, loss=loss, metric=metric,
        progress=lambda line: err.print(line, markup=False, highlight=False),
        desc=f"train {name.removeprefix('zoo:')}",
    )  # fmt: skip
    runs: dict[str, Any] = {}
    dense_model = copy.deepcopy(model) if compare_dense else None
    err.print(f"training {name} on {len(tr):,} samples of {data.train_data} ({method or 'dense'})")
    result = train_model(model, tr, method=method, lasso_ratio=lasso_ratio, **schedule, **kw)
    runs[method or "dense"] = result.report
    if dense_model is not None:
        err.print("training the dense baseline (same init, seed and settings)")
        runs["dense"] = train_model(dense_model, tr, **kw).report
    model = result.model
    report: dict[str, Any] = {"arch": load.arch, "start_weights": model_path, "runs": runs}
    if "dense" in runs and method is not None:
        d, p = runs["dense"], runs[method]
        report["versus_dense"] = {
            "wall_time": round(p["total"]["wall_s"] / max(d["total"]["wall_s"], 1e-9), 4),
            "train_macs": round(p["total"]["train_macs"] / max(d["total"]["train_macs"], 1), 4),
            "final_macs": round(p["final"]["macs"] / max(d["final"]["macs"], 1), 4),
            "val_score_change": round(p["final"].get("val_score", 0) - d["final"].get("val_score", 0), 3),
        }
        if "test_score" in p["final"]:
            report["versus_dense"]["test_score_change"] = round(p["final"]["test_score"] - d["final"]["test_score"], 3)
    fin = result.report["final"]
    meta: dict[str, Any] = {
        "input_shape": [1, *shape], "train_data": data.train_data, "val_accuracy": fin.get("val_score"),
        "augment": augment,
    }  # fmt: skip
    if vf is not None:
        meta["val_fraction"] = vf
    if "test_score" in fin:
        meta["test_accuracy"] = fin["test_score"]
    set_meta(model, **meta)
    save_model(model.cpu(), dest.output, force=dest.force)
    rows = []
    for key, r in runs.items():
        rows.append([
            key, r["total"]["wall_s"], r["total"]["train_macs"], r["final"]["macs"], r["final"]["params"],
            r["final"].get("val_score"), r["final"].get("test_score"),
        ])  # fmt: skip
    cols = ["run", "train s", "train MACs", "MACs", "params", "val " + metric.label, "test " + metric.label]
    out.print(table(f"{name} -> {dest.output}", cols, rows))
    if "versus_dense" in report:
        out.print(table("versus dense", ["", "ratio / change"], [[k, v] for k, v in report["versus_dense"].items()]))
    if dest.json_out:
        emit_json(report, dest.json_out, dest.force)
    if dest.report:
        _write_report(dest.report, name or "", report, rows, cols, dest.force)
    return report


def _write_report(folder: str, name: str, report: dict, rows: list, cols: list, force: bool) -> None:
    from compress.report.render import prepare_folder, write_folder

    sections = [("Runs", cols, rows)]
    for key, r in report["runs"].items():
        ep = [[e["epoch"], e["wall_s"], e["train_macs"], e["macs"], e["batch"], e["loss"], e.get("val_score")]
              for e in r["epochs"]]  # fmt: skip
        sections.append((f"{key}: epochs", ["epoch", "wall s", "train MACs", "MACs", "batch", "loss", "val"], ep))
        if r["reconfigurations"]:
            rc = [[c["epoch"], c["step"], c["macs"], c["params"], c["batch"], c["removed_channels"],
                   c["removed_branches"], c["frozen"]] for c in r["reconfigurations"]]  # fmt: skip
            sections.append((f"{key}: reconfigurations",
                             ["epoch", "step", "MACs", "params", "batch", "channels removed", "branches", "frozen"],
                             rc))  # fmt: skip
    summary = next(iter(report["runs"].values()))["convention"]
    write_folder(prepare_folder(folder, force), f"compress train: {name}", summary, sections, [], report, force=True)
    err.print(f"wrote {folder}/report.html")


@app.command(cls=Command)
@grouped
def train(
    model_path: ModelPathArg = None,
    load: ModelOptions = None,  # type: ignore[assignment]
    data: DataOptions = None,  # type: ignore[assignment]
    dest: OutputOptions = None,  # type: ignore[assignment]
    method: Annotated[
        TrainMethod | None,
        option(
            "--method",
            "-m",
            panel=METHOD,
            help="channel-union: PruneTrain (group lasso from the first step, "
            "zero channels removed as it trains); none: dense training, the baseline.",
        ),
    ] = None,  # fmt: skip
    target_macs: Annotated[float | None, _fraction("target-macs")] = None,
    target_params: Annotated[float | None, _fraction("target-params")] = None,
    lasso_ratio: Annotated[
        float,
        option(
            "--lasso-ratio",
            min=0.0,
            max=1000.0,
            panel=METHOD,
            help="Group-lasso strength relative to ln(classes); larger removes more, sooner.",
        ),
    ] = 0.8,  # fmt: skip
    cost_weight: Annotated[
        float,
        option(
            "--cost-weight",
            panel=METHOD,
            help="Pull each channel group by (its channels' MACs / the mean's) ** this, in [0, 4]: 0 pulls all "
            "alike; 1 prunes the costly high-resolution layers first (more time saved; 0.5: less accuracy lost).",
        ),
    ] = 1.0,  # fmt: skip
    min_channels: Annotated[
        int,
        option(
            "--min-channels",
            panel=METHOD,
            help="The fewest channels a channel group keeps (2: a one-channel stage learnt less).",
        ),
    ] = 2,
    reconfig_every: Annotated[
        float,
        option("--reconfig-every", panel=METHOD, help="Epochs between reconfigurations (0.25: four times an epoch)."),
    ] = 0.25,
    freeze_last: Annotated[
        float,
        option(
            "--freeze-last",
            panel=METHOD,
            help="Fraction of the training, at its end, with the "
            "architecture fixed and the pull off (accuracy recovers).",
        ),
    ] = 0.25,  # fmt: skip
    grow_batch: Annotated[
        bool,
        flag(
            "--grow-batch",
            panel=METHOD,
            help="Grow the batch into the memory reconfiguration frees (lr scaled with it); capped by --max-batch.",
        ),
    ] = False,  # fmt: skip
    max_batch: Annotated[
        int | None, option("--max-batch", min=1, panel=METHOD, help="Cap of --grow-batch (default 4 x --batch-size).")
    ] = None,
    compare_dense: Annotated[
        bool, flag("--compare-dense", panel=METHOD, help="Also train the dense baseline (same init and seed).")
    ] = False,
    epochs: Annotated[float, option("--epochs", min=0.01, max=10_000, panel=TRAINING, help="Training epochs.")] = 10,
    lr: Annotated[
        float, option("--lr", min=1e-9, max=10.0, panel=TRAINING, help="Peak learning rate (cosine).")
    ] = 0.05,
    optimizer: Annotated[Optimizer, option("--optimizer", panel=TRAINING, help="Optimizer.")] = Optimizer.sgd,
    batch_size: Annotated[
        int, option("--batch-size", min=1, max=65_536, panel=TRAINING, help="Samples per step.")
    ] = 64,
    weight_decay: Annotated[
        float, option("--weight-decay", min=0.0, max=1.0, panel=TRAINING, help="L2 weight decay.")
    ] = 1e-4,
    augment: Annotated[
        int | None,
        option(
            "--augment",
            min=0,
            max=512,
            panel=TRAINING,
            help="Random shifts of up to N pixels (default: 2 for images of 24 px or more, else 0).",
        ),
    ] = None,  # fmt: skip
    width: Annotated[
        float, option("--width", min=0.01, max=64.0, panel=TRAINING, help="Width multiplier of a zoo architecture.")
    ] = 1.0,
    val_fraction: Annotated[
        float | None,
        option(
            "--val-fraction",
            min=0.01,
            max=0.9,
            panel=TRAINING,
            help="Held out of --train-data for validation (default 0.2) unless --val-data is given.",
        ),
    ] = None,  # fmt: skip
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
):
    """Train a model from its own init (or given weights): dense, or PruneTrain (--method channel-union), which
    removes channels as it trains so that later epochs compute less. Prints and writes (--json, --report) the
    training time, training MACs and accuracy per epoch.

    Examples:

        compress train --arch zoo:resnet20 --train-data "mnist5k?size=32" --epochs 8 -o dense.pt

        compress train --arch zoo:resnet20 --train-data "mnist5k?size=32" -m channel-union --target-macs 0.4
        --compare-dense --json train.json -o pt.pt
    """
    run_train(
        model_path, load, data, dest, method=method.value if method else None, epochs=epochs, lr=lr,
        optimizer=optimizer.value, batch_size=batch_size, augment=augment, seed=seed, weight_decay=weight_decay,
        target_macs=target_macs, target_params=target_params, lasso_ratio=lasso_ratio, reconfig_every=reconfig_every,
        cost_weight=cost_weight, min_channels=min_channels, freeze_last=freeze_last, grow_batch=grow_batch,
        max_batch=max_batch, compare_dense=compare_dense, width=width,
        val_fraction=val_fraction, threads=threads,
    )  # fmt: skip
