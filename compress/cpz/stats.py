"""Per-tensor numbers of a .cpz for tables and reports: bytes, bits per weight, index overhead."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

from compress.coding import streams
from compress.cpz.container import HEAD, encode_model, read_manifest


def read_stats(path) -> dict[str, Any]:
    blob = Path(path).read_bytes()
    manifest, _ = read_manifest(blob, path)
    return {"manifest_bytes": HEAD.unpack_from(blob, 0)[3], "tensors": [tensor_row(e) for e in manifest["tensors"]]}


def tensor_row(e: dict) -> dict:
    """Per-tensor numbers for tables: bytes, bits per weight, index overhead, the values' coding and its gain over
    fixed-width packing (``huffman_gain``, so named before the ANS coder). Only the fields that decoding an entry
    of its ``enc`` reads (and checked) are read: others may be anything."""
    n = math.prod(e["shape"])
    coded = e["enc"] in ("uniform", "codebook")
    row = {
        "name": e["name"],
        "enc": e["enc"],
        "numel": n,
        "bytes": e["length"],
        "bits_per_weight": round(8 * e["length"] / max(n, 1), 3),
        "mode": e["mode"] if coded else "-",
    }
    if e["enc"] == "sparse_raw" or (coded and e["mode"] == "sparse"):
        row["index_bytes"] = e["index_bytes"]
        row["index"] = e["index"]["index"]
    if coded:
        v = e["values"]
        coded_bytes = e["length"] - e["params_bytes"] - row.get("index_bytes", 0)
        row["bits"] = e["bits"]
        row["coding"] = v["coding"]
        row["huffman_gain"] = round(streams.fixed_bytes(v) / max(coded_bytes, 1), 3) if v["count"] else 1.0
    return row


@functools.singledispatch
def size_bytes(model, graph: bool = False, coder: str = "auto") -> dict[str, Any]:
    """Encoded .cpz size, the size the same content takes without Huffman coding, and the bytes of
    each layer's tensors (weight, bias, buffers) in the .cpz. ``graph``: with the graph
    a .cpz of the user's own classes holds (``graph``), as ``save_model`` writes it. A kind of model saved
    otherwise registers its own (an INT8 model: its file's bytes, both coded and fixed)."""
    _, stats = encode_model(copy.deepcopy(model), graph=graph, coder=coder)
    fixed = 0
    layers: dict[str, int] = {}
    for e in stats["tensors"]:
        if "values" in e:
            fixed += e.get("params_bytes", 0) + e.get("index_bytes", 0) + streams.fixed_bytes(e["values"])
        else:
            fixed += e["length"]
        layer = e["name"].rpartition(".")[0]
        layers[layer] = layers.get(layer, 0) + e["length"]
    return {
        "coded": stats["file_bytes"],
        "fixed": fixed + stats["manifest_bytes"] + 20,
        "layers": layers,
        "graph_note": stats["graph_note"],
    }
