"""Hostile stored graphs and input shapes through the CLI, each command in a capped child process: the attacks
that got past the first per-op formulas (a 1-channel convolution that oneDNN copies into 16-channel blocks, a
chain of cheap-looking convolutions that takes minutes, depthwise convolutions charged at dense speed, a
plain .cpz whose metadata names a 1024 x 1024 input). Each ends in one line, or runs bounded."""

import json
import struct
import zlib

import numpy as np

from compress.cpz.container import HEAD, MAGIC, VERSION, encode_model
from compress.meta import set_meta
from compress.models import create_model
from tests.hostile_harness import run_cli_each


def make_cpz(path, nodes, tensors, input_shape):
    """A graph-only .cpz (``"arch": null``) of ``nodes`` over ``tensors`` [(name, array)], checksums right."""
    entries, sections = [], []
    for name, a in tensors:
        a = np.ascontiguousarray(a)
        sections.append(a.tobytes())
        entries.append(
            {
                "name": name,
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "enc": "raw",
                "length": len(sections[-1]),
                "crc": zlib.crc32(sections[-1]),
            }
        )
    graph = {
        "schema": 1,
        "input": list(input_shape),
        "dtype": "float32",
        "params": [n for n, _ in tensors],
        "buffers": [],
        "nodes": nodes,
        "outputs": [{"v": len(nodes)}],
    }
    manifest = {
        "arch": None,
        "graph": graph,
        "meta": {"d": {"input_shape": [1, *input_shape]}},
        "tensors": entries,
        "format": "cpz",
        "version": 1,
    }
    mbytes = zlib.compress(json.dumps(manifest).encode())
    body = HEAD.pack(MAGIC, VERSION, 0, len(mbytes), zlib.crc32(mbytes)) + mbytes + b"".join(sections)
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return path


def test_hostile_graphs_and_shapes_are_refused_or_run_bounded(tmp_path):
    one = [("w", np.ones((1, 1, 1, 1), np.float32))]
    conv1x1 = make_cpz(tmp_path / "c1.cpz", [["conv2d", [{"v": 0}, {"p": 0}]]], one, (1, 1024, 1024))
    chain = make_cpz(
        tmp_path / "chain.cpz", [["conv2d", [{"v": i}, {"p": 0}]] for i in range(2000)], one, (1, 1024, 1024)
    )
    depthwise = make_cpz(
        tmp_path / "dw.cpz",
        [["conv2d", [{"v": i}, {"p": 0}, None, [1, 1], [1, 1], [1, 1], 16]] for i in range(200)],
        [("w", np.full((16, 1, 3, 3), 1 / 9, np.float32))],
        (16, 64, 64),
    )
    m = create_model("resnet20").eval()
    set_meta(m, input_shape=[1, 1, 1024, 1024])
    (tmp_path / "big.cpz").write_bytes(encode_model(m)[0])
    cases = {  # name: (argv, what its one line says)
        "2,000 chained 1x1 convolutions of a 1024x1024 image (minutes a call)": (
            ["report", chain, "--no-latency"],
            "operations",
        ),
        "200 depthwise convolutions (charged at dense speed, 88 s a report)": (["report", depthwise], "batch of 32"),
        "a plain .cpz whose metadata names a 1024x1024 input": (["report", tmp_path / "big.cpz"], "justify"),
    }
    ended, child = run_cli_each([argv for argv, _ in cases.values()])
    for (what, (_, match)), e in zip(cases.items(), ended, strict=False):
        assert e.one_line_refusal and match in e.err and e.seconds < 20, (what, e)
    assert child.peak_mb < 1000, child
    # a 1-channel 1x1 convolution of a 1024x1024 image takes 16x its input in oneDNN's blocks: charged so, its
    # batch-32 latency run goes in parts within the per-call cap (1 GiB), and the whole report stays under
    # 1.5 GB resident (the address-space cap is larger here: torch maps ~1 GB it never touches)
    (e,), child = run_cli_each([["report", conv1x1]], cap_mb=3072)
    assert e.code == 0 and e.clean and e.seconds < 40, e
    assert child.peak_mb < 1500, child
