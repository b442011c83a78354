"""``compress encode`` and ``compress decode``: the .cpz container."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from compress.cli.app import app
from compress.cli.common import err, note_no_graph, out, table
from compress.cli.harness import check_output
from compress.cli.options import (
    MODEL,
    ArchOpt,
    Coder,
    CoderOpt,
    Command,
    ForceOpt,
    ModelArg,
    ModelOptions,
    OutOpt,
    flag,
    grouped,
)


@app.command(cls=Command)
@grouped
def encode(
    model: ModelArg,
    output: OutOpt,
    load: ModelOptions,
    force: ForceOpt = False,
    graph: Annotated[
        bool,
        flag(
            "--graph/--no-graph",
            panel=MODEL,
            help="For a model of your own classes, also store its graph (a few KB: "
            "compress's own list of ATen operator calls), so the .cpz decodes and runs without your code; "
            "decoders check it, and total its cost, before running it.",
        ),
    ] = True,
    coder: CoderOpt = Coder.auto,
):
    """Entropy-code a (pruned, quantized) model into one compact, checked .cpz file.

    Examples:

        compress encode lenet5-int4.pt -o lenet5.cpz

        compress encode lenet5-int4.pt --coder huffman -o lenet5-huffman.cpz

        compress encode r20-int4.pt --arch mypkg.models:resnet20 -o r20.cpz
    """
    from compress.counting import count_params
    from compress.cpz.container import save_cpz
    from compress.cpz.stats import tensor_row

    check_output(model, output, force)
    opts = load.load()
    m = opts.load(model)
    stats = save_cpz(m, output, force=force, graph=graph, input_shape=opts.input_shape, coder=coder.value)
    rows = [tensor_row(e) for e in stats["tensors"]]
    out.print(
        table(
            f"{output}",
            ["tensor", "encoding", "mode", "bits/weight", "index bytes", "coding gain", "bytes"],
            [
                [
                    r["name"],
                    r["enc"] + (f" {r['bits']}b" if r.get("bits") else ""),
                    r["mode"],
                    r["bits_per_weight"],
                    r.get("index_bytes", "-"),
                    f"{r['huffman_gain']:.2f}x {r['coding']}" if "huffman_gain" in r else "-",
                    r["bytes"],
                ]
                for r in rows
            ],
        )
    )
    dense = 4 * count_params(m)
    size = stats["file_bytes"]
    out.print(
        f"{size:,} bytes (manifest {stats['manifest_bytes']:,}); dense FP32 weights {dense:,} bytes: "
        f"[bold]{dense / size:.2f}x smaller[/bold]"
    )
    if stats["graph_bytes"]:
        out.print(f"graph: {stats['graph_bytes']:,} bytes; it decodes without your code (or with --arch)")
    else:
        note_no_graph(stats["graph_note"])
    err.print(f"wrote {output}")


@app.command(cls=Command)
def decode(cpz: ModelArg, output: OutOpt, arch: ArchOpt = None, force: ForceOpt = False):
    """Decode a .cpz back into a model file (runnable nn.Module; no code from the .cpz runs).
    A model of your own classes is rebuilt with your --arch (the code), its structure and weights
    from the file; without --arch, from the graph the file holds (its operators checked against a
    fixed table and its memory and work totalled first), as a module that interprets it.

    Examples:

        compress decode lenet5.cpz -o lenet5-decoded.pt

        compress decode r20.cpz --arch mypkg.models:resnet20 -o r20-decoded.pt
    """
    from compress.cpz.container import load_cpz
    from compress.model_io import arch_base, save_model

    check_output(cpz, output, force)
    m = load_cpz(cpz, base=arch_base(arch))
    save_model(m, output, force=force)
    err.print(f"wrote {output} ({Path(output).stat().st_size:,} bytes)")
