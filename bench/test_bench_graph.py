"""The graph decoder's cost is linear in the graph: decode (parse, cost on the meta device, model) of a
residual CNN's graph at 1x, 10x and 100x its depth; the time per node must stay flat."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from bench.conftest import once


class Unit(nn.Module):
    """conv-relu with a residual add: three nodes of the stored graph, one tensor (a .cpz holds at most
    20,000 tensors, so 5,000 units of conv-bn would not fit)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


def _doc(units: int):
    """The graph of a stem, ``units`` residual units and a head, and its tensors. One unit is exported;
    the stored graph is then tiled, each copy reading its own tensors (appended as buffers, so earlier
    indices stay), because torch.export of 5,000 units would take minutes and only decoding is measured."""
    from compress.graph.capture import capture

    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), Unit(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    doc = capture(m, (1, 1, 16, 16))
    tensors = {k: v.detach() for k, v in (dict(m.named_parameters()) | dict(m.named_buffers())).items()}
    names = doc["params"] + doc["buffers"]
    reads = [
        any(isinstance(x, dict) and "p" in x and names[x["p"]].startswith("1.") for x in n[1]) for n in doc["nodes"]
    ]
    a = reads.index(True)  # the unit: from its conv ...
    b = next(k for k in range(a, len(doc["nodes"])) if doc["nodes"][k][0] == "add.Tensor")  # ... to its add
    size, buffers, nodes = b - a + 1, list(doc["buffers"]), doc["nodes"][: b + 1]

    def shift(v, u, pmap):
        if isinstance(v, list):
            return [shift(x, u, pmap) for x in v]
        if isinstance(v, dict) and "v" in v:
            i = v["v"]
            return {"v": i + u * size if i > a else (b + 1) + (u - 1) * size if i == a else i}
        if isinstance(v, dict) and "p" in v:
            return {"p": pmap.get(v["p"], v["p"])}
        return v

    for u in range(1, units):
        pmap = {}
        for j, name in enumerate(names):
            if name.startswith("1."):
                new = f"u{u}.{name[2:]}"
                tensors[new], pmap[j] = tensors[name].clone(), len(doc["params"]) + len(buffers)
                buffers.append(new)
        nodes += [[n[0], shift(n[1], u, pmap)] + n[2:] for n in doc["nodes"][a : b + 1]]
    dv = (units - 1) * size
    tail = [
        [n[0], [{"v": x["v"] + dv} if isinstance(x, dict) and "v" in x and x["v"] > a else x for x in n[1]]] + n[2:]
        for n in doc["nodes"][b + 1 :]
    ]
    return {**doc, "buffers": buffers, "nodes": nodes + tail, "outputs": [{"v": doc["outputs"][0]["v"] + dv}]}, tensors


def test_graph_decode_is_linear_in_its_nodes(benchmark):
    from compress.graph.model import rebuild

    rows = []

    def measure():
        for scale, units in ((1, 50), (10, 500), (100, 5000)):
            doc, tensors = _doc(units)
            t0 = time.perf_counter()
            model = rebuild(doc, tensors)
            dt = time.perf_counter() - t0
            with torch.no_grad():
                assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
            rows.append(
                {
                    "scale": scale,
                    "nodes": len(doc["nodes"]),
                    "decode_s": round(dt, 4),
                    "us_per_node": round(1e6 * dt / len(doc["nodes"]), 1),
                }
            )

    once(benchmark, measure)
    benchmark.extra_info.update(
        graph_decode=rows, compression_ratio=None, accuracy=None, accuracy_drop=None, latency_ms=None
    )
    per_node = [r["us_per_node"] for r in rows]
    assert max(per_node) < 3 * min(per_node), rows  # linear: the cost of a node does not grow with the graph
