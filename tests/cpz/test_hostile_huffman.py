"""Hostile .cpz files aimed at the symbol streams and their vectorised Huffman decoder.

Every file is a real LeNet-5's .cpz (k-means and affine min-max, pruned and not) with one thing forged and every
checksum right, so only the reader's checks stand between it and harm. All of them go through `compress decode`
(one case `compress report`) in one child process under the harness's memory cap and CPU limit: each must end in
one line on stderr naming what is wrong, a non-zero exit, no output file, in a few CPU seconds.
"""

from __future__ import annotations

import copy
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from compress.coding import huffman as H
from compress.coding import streams
from compress.coding.packing import pack, unpack
from compress.cpz.container import HEAD, MAGIC, VERSION, decode_model, encode_model, read_manifest
from compress.cpz.stats import read_stats
from compress.errors import FormatError
from compress.models import create_model
from compress.quantize import QuantConfig, quantize_, quantize_tensor, set_weight
from tests.helpers import Calls
from tests.hostile_harness import run_cli_each


def forge(manifest: dict, sections: list[bytes]) -> bytes:
    """A .cpz of ``manifest`` and ``sections`` with every length and checksum right."""
    for e, data in zip(manifest["tensors"], sections, strict=True):
        e.pop("offset", None)
        e["length"], e["crc"] = len(data), zlib.crc32(data)
    mbytes = zlib.compress(json.dumps(manifest).encode())
    body = HEAD.pack(MAGIC, VERSION, 0, len(mbytes), zlib.crc32(mbytes)) + mbytes + b"".join(sections)
    return body + struct.pack("<I", zlib.crc32(body))


def split(blob: bytes) -> tuple[dict, list[bytes]]:
    manifest, start = read_manifest(blob)
    ends = np.cumsum([0] + [e["length"] for e in manifest["tensors"]])
    return copy.deepcopy(manifest), [blob[start + a : start + b] for a, b in zip(ends[:-1], ends[1:], strict=True)]


def edit(blob: bytes, tensor: str, fn) -> bytes:
    """``blob`` with ``fn(entry, params, index, values) -> (params, index, values)`` applied to one coded tensor."""
    manifest, sections = split(blob)
    i = next(i for i, e in enumerate(manifest["tensors"]) if e["name"] == tensor)
    e, sec = manifest["tensors"][i], sections[i]
    ib = e.get("index_bytes", 0) if e["mode"] == "sparse" else 0
    pb = e["params_bytes"]
    params, index, values = fn(e, sec[:pb], sec[pb : pb + ib], sec[pb + ib :])
    e["params_bytes"] = len(params)
    if e["mode"] == "sparse":
        e["index_bytes"] = len(index)
    sections[i] = params + index + values
    return forge(manifest, sections)


def stream_parts(data: bytes, f: dict) -> tuple[np.ndarray, np.ndarray, bytes]:
    """A Huffman stream's code lengths, sync points (bits per block) and payload."""
    a, b, _ = f["parts"]
    return (
        unpack(data[:a], 4, f["alpha"]).astype(np.int64),
        np.frombuffer(data[a : a + b], "<u2").astype(np.int64),
        data[a + b :],
    )


def stream_bytes(lengths, sync, payload: bytes, f: dict) -> bytes:
    """The stream's bytes; ``f["parts"]`` set to match them."""
    table, sb = pack(np.asarray(lengths), 4), np.asarray(sync).astype("<u2").tobytes()
    f["parts"] = [len(table), len(sb), len(payload)]
    return table + sb + payload


def values_stream(blob: bytes, tensor: str, fn) -> bytes:
    """``fn(fields, lengths, sync, payload)`` -> new (lengths, sync, payload), or the stream's bytes as they are."""

    def g(e, params, index, values):
        f = e["values"]
        out = fn(f, *stream_parts(values, f))
        return params, index, out if isinstance(out, bytes) else stream_bytes(*out, f)

    return edit(blob, tensor, g)


def set_field(blob: bytes, tensor: str, path: tuple, value) -> bytes:
    manifest, sections = split(blob)
    node = next(e for e in manifest["tensors"] if e["name"] == tensor)
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return forge(manifest, sections)


def codebook_file(names: int, sym: np.ndarray, lengths: np.ndarray, block: int) -> bytes:
    """A graph-less, architecture-less .cpz of ``names`` k-means sections, each the stream ``sym`` coded with
    ``lengths`` in blocks of ``block`` (whatever the lengths promise of the symbols' frequencies)."""
    payload, sync = H.encode(sym, lengths, block)
    f = {"coding": "huff", "alpha": len(lengths), "count": len(sym), "block": block}
    data = stream_bytes(lengths, sync, payload, f)
    cb = np.linspace(-1, 1, len(lengths) - 1).astype("<f4").tobytes()
    entry = {"shape": [len(sym)], "dtype": "float32", "enc": "codebook", "bits": 8, "k": len(lengths) - 1}
    entry.update(mode="dense", params_bytes=len(cb), values=f)
    tensors = [dict(copy.deepcopy(entry), name=f"t{i}.weight") for i in range(names)]
    return forge({"format": "cpz", "version": 1, "arch": None, "tensors": tensors}, [cb + data] * names)


@pytest.fixture(scope="module")
def lenet5_files():
    """LeNet-5 (430 k weights): 4-bit k-means, dense (fc1 a long stream: the stepping decoder; conv2 a short
    one: the jumping decoder); and 4-bit affine min-max with the smallest 70% of each weight zero (gap-stream
    and bitmask indices)."""
    out = {}
    for key, sparsity, cfg in (
        ("kmeans", None, QuantConfig(bits=4, scheme="kmeans")),
        ("affine", 0.7, QuantConfig(bits=4, scheme="minmax", symmetric=False)),
    ):
        torch.manual_seed(0)
        m = create_model("lenet5")
        if sparsity:
            with torch.no_grad():  # magnitude pruning, as a pruner leaves it: exact zeros
                for p in (m.conv1.weight, m.conv2.weight, m.fc1.weight, m.fc2.weight):
                    p[p.abs() < p.abs().flatten().quantile(sparsity)] = 0
        quantize_(m, cfg)
        out[key] = encode_model(m, coder="huffman")[0]  # the Huffman decoder is what is attacked
    manifest, _ = split(out["kmeans"])
    coded = {e["name"]: e["values"] for e in manifest["tensors"] if e.get("enc") == "codebook"}
    assert coded["fc1.weight"]["coding"] == coded["conv2.weight"]["coding"] == "huff"
    assert sum(coded["fc1.weight"]["parts"][1:]) * 8 > H.CHAIN_BITS >= coded["conv2.weight"]["parts"][2] * 8
    manifest, _ = split(out["affine"])
    index = {e["name"]: e.get("index", {}).get("index") for e in manifest["tensors"]}
    assert index["fc1.weight"] == "gaps" and index["conv1.weight"] == "bitmask", index
    return out


def _stream_cases(km: bytes) -> dict:
    """Lies in a Huffman stream, in the long stream (fc1) and the short one (conv2)."""
    cases = {}
    for t in ("fc1.weight", "conv2.weight"):

        def first(f, L, s, p, v=0):
            s[0] = v
            return L, s, p

        def shift(f, L, s, p):
            s[0] += 1
            s[1] -= 1
            return L, s, p

        def last(f, L, s, p):
            s[-1] = 0xFFFF
            return L, s, p

        def underfull(f, L, s, p):
            L[np.argmax(L)] = 0
            return L, s, p

        def cut(f, L, s, p):
            s[-1] -= 24
            return L, s, p[:-3]

        def field(key, value):
            def g(fields, L, s, p):
                fields[key] = value
                return stream_bytes(L, s, p, dict(fields))  # the parts as they were: only the field lies

            return g

        for what, fn, match in (
            ("code lengths over-full (Kraft sum 17/2)", lambda f, L, s, p: (np.ones_like(L), s, p), "prefix code"),
            ("every code length 0", lambda f, L, s, p: (np.zeros_like(L), s, p), "no code"),
            ("every code length 15", lambda f, L, s, p: (np.full_like(L, 15), s, p), "corrupt Huffman"),
            ("a used symbol without a code (under-full)", underfull, "corrupt Huffman"),
            ("sync points reversed", lambda f, L, s, p: (L, s[::-1], p), "corrupt Huffman"),
            ("a block of 0 bits", first, "sync points"),
            ("a sync point in the middle of a code", shift, "corrupt Huffman"),
            ("a sync point past the payload", last, "sync points"),
            ("trailing garbage after the payload", lambda f, L, s, p: (L, s, p + b"\0\0"), "sync points"),
            ("payload cut short", lambda f, L, s, p: (L, s, p[:-3]), "sync points"),
            ("payload and last sync point cut short", cut, "corrupt Huffman"),
            ("count of 10^9 symbols", field("count", 10**9), "'count'"),
            ("count null", field("count", None), "'count'"),
            ("count a float", field("count", 1.5), "'count'"),
            ("count a bool", field("count", True), "'count'"),
            ("count a string", field("count", "5"), "'count'"),
            ("count nested", field("count", {"n": 5}), "'count'"),
            ("block 0", field("block", 0), "'block'"),
            ("block 2^40", field("block", 1 << 40), "'block'"),
            ("block 1 (sync table the wrong size)", field("block", 1), "wrong size"),
            ("alphabet of 2^16", field("alpha", 1 << 16), "alphabet"),
            ("parts of negative size", field("parts", [-1, 0, 0]), "parts"),
        ):
            cases[f"{t}: {what}"] = (values_stream(km, t, fn), match)
        count = next(e for e in split(km)[0]["tensors"] if e["name"] == t)["values"]["count"]
        cases[f"{t}: count one short"] = (values_stream(km, t, field("count", count - 1)), "corrupt Huffman")
    return cases


def _field_cases(km: bytes, affine: bytes) -> dict:
    """Quantization fields that the decoder used unchecked (all decoded before these checks)."""

    def params(tensor, fn, blob):
        def g(e, p, ix, v):
            a = np.frombuffer(p, "<f2" if e.get("cb16") else "<f4").copy()
            fn(e, a)
            return a.tobytes(), ix, v

        return edit(blob, tensor, g)

    manifest, _ = split(affine)
    c = next(e for e in manifest["tensors"] if e["name"] == "fc1.weight")["channels"]

    def at(i, v):
        return lambda e, a: a.__setitem__(i, v)

    cases = {}
    for what, v in (("NaN", np.nan), ("300", 300), ("-5", -5), ("3.5", 3.5), ("1e30", 1e30)):
        cases[f"affine zero point {what}"] = (params("fc1.weight", at(c, v), affine), "zero point")
    for what, v in (("NaN", np.nan), ("inf", np.inf)):
        cases[f"scale {what}"] = (params("fc1.weight", at(0, v), affine), "scale not")
        cases[f"codebook value {what}"] = (params("fc1.weight", at(0, v), km), "codebook value")
    for v in ("yes", 2, None, [1], False):
        forged = set_field(affine, "fc1.weight", ("per_channel",), v)
        cases[f"per_channel {v!r} with {c} scales"] = (forged, "per_channel")
    cases["a 16-entry codebook for 2 bits"] = (set_field(km, "fc1.weight", ("bits",), 2), "'k'")
    cases["shape of exactly 2^31 elements"] = (set_field(km, "fc1.weight", ("shape",), [1 << 16, 1 << 15]), "too large")
    return cases


def _index_cases(affine: bytes) -> dict:
    """Gap streams (Deep Compression's relative indices) that lie about where the weights are."""
    manifest, sections = split(affine)
    i = next(i for i, e in enumerate(manifest["tensors"]) if e["name"] == "fc1.weight")
    e = manifest["tensors"][i]
    real = streams.decode_symbols(sections[i][e["params_bytes"] :][: e["index_bytes"]], e["index"]["stream"], 1 << 20)
    real = real.astype(np.int64)

    def gaps(sym, alpha=256):
        def g(e, p, ix, v):
            data, f = streams.encode_symbols(sym, alpha)
            e["index"] = {"index": "gaps", "nnz": int((sym != streams.GAP_FILLER).sum()), "stream": f}
            return p, data, v

        return edit(affine, "fc1.weight", g)

    fillers = np.full(2000, streams.GAP_FILLER)  # 510,000 positions past the last weight of 400,000
    return {
        "gap stream whose fillers run past numel": (gaps(np.concatenate([real, fillers])), "ends in a filler"),
        "gap stream ending in one filler": (gaps(np.concatenate([real, fillers[:1]])), "ends in a filler"),
        "gap stream of alphabet 2^16 (the same gaps)": (gaps(real, 1 << 16), "wrong alphabet"),
        "gap stream that points past numel": (gaps(np.append(real, 254)), "past the tensor"),
        "bitmask of the wrong count of ones": (set_field(affine, "conv1.weight", ("index", "nnz"), 5), "nonzeros"),
        "gap stream of the wrong count of nonzeros": (set_field(affine, "fc1.weight", ("index", "nnz"), 5), "nonzeros"),
    }


def _slow_cases() -> dict:
    """Valid streams that cost work their bytes do not pay for."""
    # code lengths that promise 1-bit codes (so four symbols a step), a stream of only 15-bit ones: every step
    # of every lane overruns its window three times over
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 0])
    tiny = np.array([0, 1, 1, 1, 1, 1, 1, 1] * 4)
    short = np.zeros(17, dtype=np.int64)
    short[:2] = 1
    return {
        # 30 streams of 3 blocks of 4,096 15-bit codes (500 KB): 3.2 s of CPU (6 us a byte) to decode, 5x what
        # 500 KB may ask for; refused now (compress writes blocks of 512)
        "blocks of 4,096 15-bit codes that overrun every step": (
            codebook_file(30, np.full(3 * 4096 - 1, 14), lengths, 4096),
            "'block'",
        ),
        # the same at the largest block read, 10 streams (170 KB): decoded (0.2 s of CPU, ~1 us a byte), then
        # refused for the architecture it lacks
        "blocks of 512 15-bit codes that overrun every step": (
            codebook_file(10, np.full(18 * 512 - 1, 14), lengths, 512),
            "no architecture",
        ),
        # 1,800 streams of 32 symbols: each a decoding table and a decoder's fixed overhead; refused by work
        "1,800 tiny Huffman streams in 150 KB": (codebook_file(1800, tiny, short, 512), "work"),
    }


def _fuzz_cases(blob: bytes, count: int = 32) -> list[bytes]:
    """A seeded fuzz of a real file's sections with their checksums made right again: bit flips (three in four)
    and cuts of 1 to 7 bytes (the section's length in the manifest cut with it), sections drawn by size."""
    rng = np.random.default_rng(0)
    manifest, sections = split(blob)
    sizes = np.array([len(s) for s in sections])
    out = []
    for j in range(count):
        i = int(rng.choice(len(sections), p=sizes / sizes.sum()))
        sec = bytearray(sections[i])
        at = int(rng.integers(len(sec)))
        if j % 4:
            sec[at] ^= 1 << int(rng.integers(8))
        else:
            del sec[at : at + int(rng.integers(1, 8))]
        out.append(forge(copy.deepcopy(manifest), [*sections[:i], bytes(sec), *sections[i + 1 :]]))
    return out


@pytest.fixture(scope="module")
def ran(lenet5_files, tmp_path_factory):
    """Every case through `compress decode` in one capped child (torch imported once):
    {group: [(what, match, output path, Ended)]}."""
    km, affine = lenet5_files["kmeans"], lenet5_files["affine"]
    for blob in (km, affine):
        decode_model(blob)  # the files forged from are valid
    tmp = tmp_path_factory.mktemp("hostile_huffman")
    groups = {
        "refused": {**_stream_cases(km), **_field_cases(km, affine), **_index_cases(affine), **_slow_cases()},
        "fuzz": {f"mutation {j}": (b, None) for j, b in enumerate(_fuzz_cases(affine))},
    }
    rows, argvs = [], []
    for group, cases in groups.items():
        for what, (blob, match) in cases.items():
            i = len(argvs)
            (tmp / f"{i}.cpz").write_bytes(blob)
            argvs.append(["decode", tmp / f"{i}.cpz", "-o", tmp / f"{i}.pt"])
            rows.append((group, what, match, tmp / f"{i}.pt"))
    ended, _ = run_cli_each(argvs)
    out: dict = {}
    for (group, what, match, pt), e in zip(rows, ended, strict=True):
        out.setdefault(group, []).append((what, match, pt, e))
    return out


def test_hostile_huffman_streams_are_refused_in_one_line(ran):
    for what, match, pt, e in ran["refused"]:
        assert e.one_line_refusal and ("not a valid .cpz file" in e.err or "refused" in e.err), (what, e)
        assert match in e.err and e.seconds < 10 and e.peak_mb < 1000, (what, e)
        assert not pt.exists(), what


def test_mutated_sections_decode_or_are_refused(ran):
    refused = 0
    for what, _, pt, e in ran["fuzz"]:
        if e.code == 0:
            assert pt.exists() and e.clean and e.err.startswith("wrote "), (what, e)
        else:
            assert e.one_line_refusal and "not a valid .cpz file" in e.err and not pt.exists(), (what, e)
            refused += 1
        assert e.seconds < 10, (what, e)
    assert 0 < refused < len(ran["fuzz"])  # some mutations change only weights (a bit of a code for another)


def test_report_reads_only_the_fields_decoding_checked(tmp_path):
    """Fields that an entry of its kind does not use -- values and an escape sequence as mode on a raw tensor, an
    index on a coded dense one -- are ignored by decoding, and were read by `report`'s table of the .cpz after it
    (`read_stats`): an internal error. It reads only what decoding checked."""
    m = create_model("lenet5")
    set_weight(m.fc2, quantize_tensor(m.fc2.weight, 4, "minmax"))  # one coded layer, the rest raw
    manifest, sections = split(encode_model(m, coder="huffman")[0])
    for e in manifest["tensors"]:
        e.update(values=5, mode="\x1b[31m") if e["enc"] == "raw" else e.update(index_bytes=3)
    assert {e["enc"] for e in manifest["tensors"]} == {"raw", "uniform"}
    (tmp_path / "m.cpz").write_bytes(forge(manifest, sections))
    decode_model((tmp_path / "m.cpz").read_bytes())
    rows = {r["name"]: r for r in read_stats(tmp_path / "m.cpz")["tensors"]}
    assert rows["conv1.weight"]["mode"] == "-" and "coding" not in rows["conv1.weight"], rows
    assert rows["fc2.weight"]["mode"] == "dense" and "index_bytes" not in rows["fc2.weight"], rows


def test_the_decoders_refusals_are_format_errors_in_the_library():
    """The block check from the library, before any stream is decoded (counted in calls, not seconds)."""
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 15, 0])
    blob = codebook_file(30, np.full(3 * 4096 - 1, 14), lengths, 4096)
    with Calls() as c, pytest.raises(FormatError, match="'block'"):
        decode_model(blob)
    assert c.n < 20_000, c.n
