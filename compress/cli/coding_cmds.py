"""``compress encode`` and ``compress decode``: the .cpz container."""
from __future__ import annotations

from pathlib import Path

from . import app
from .common import ArchOpt, ForceOpt, ModelArg, OutOpt, TrustOpt, err, out, table
from .stage import check_output


@app.command()
def encode(model: ModelArg, output: OutOpt, arch: ArchOpt = None, trust_pickle: TrustOpt = False,
           force: ForceOpt = False):
    """Huffman-code a (pruned, quantized) model into one compact, checked .cpz file.

    Examples:

        compress encode lenet5-int4.pt -o lenet5.cpz
    """
    from ..coding.container import save_cpz
    from ..coding.stats import tensor_row
    from ..formats import load_model
    from ..metrics import count_params

    check_output(model, output, force)
    m = load_model(model, arch=arch, trust_pickle=trust_pickle)
    stats = save_cpz(m, output, force=force)
    rows = [tensor_row(e) for e in stats["tensors"]]
    out.print(table(f"{output}", ["tensor", "encoding", "mode", "bits/weight", "index bytes", "Huffman gain", "bytes"],
                    [[r["name"], r["enc"] + (f" {r['bits']}b" if r.get("bits") else ""), r["mode"],
                      r["bits_per_weight"], r.get("index_bytes", "-"),
                      f"{r['huffman_gain']:.2f}x" if "huffman_gain" in r else "-", r["bytes"]] for r in rows]))
    dense = 4 * count_params(m)
    size = stats["file_bytes"]
    out.print(f"{size:,} bytes (manifest {stats['manifest_bytes']:,}); dense FP32 weights {dense:,} bytes: "
              f"[bold]{dense / size:.2f}x smaller[/bold]")
    err.print(f"wrote {output}")


@app.command()
def decode(cpz: ModelArg, output: OutOpt, arch: ArchOpt = None, force: ForceOpt = False):
    """Decode a .cpz back into a model file (runnable nn.Module; no code from the .cpz runs).
    A model of your own classes is rebuilt with your --arch (the code), its structure and weights
    from the file.

    Examples:

        compress decode lenet5.cpz -o lenet5-decoded.pt

        compress decode r20.cpz --arch mypkg.models:resnet20 -o r20-decoded.pt
    """
    from ..coding.container import load_cpz
    from ..formats import arch_base, save_model

    check_output(cpz, output, force)
    m = load_cpz(cpz, base=arch_base(arch))
    save_model(m, output, force=force)
    err.print(f"wrote {output} ({Path(output).stat().st_size:,} bytes)")
