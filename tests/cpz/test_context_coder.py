"""The adaptive ANS coder of .cpz streams (compress/coding/arith.py): real quantized tensors round-trip
bit-exactly, ``auto`` is never larger than Huffman, ``huffman`` writes the bytes of before, and hostile
ANS-coded sections are refused in one line (in a capped child process, tests/hostile_harness.py)."""

import copy

import numpy as np
import pytest
import torch

from compress.coding import arith, streams
from compress.cpz.container import decode_model, encode_model
from compress.errors import FormatError
from compress.quant_state import get_state
from compress.quantize import QuantConfig, quantize_
from tests.cpz.test_hostile_cpz import forge, unpack
from tests.hostile_harness import run_cli_each


@pytest.mark.parametrize("alpha", [2, 5, 17, 257, arith.MAX_ALPHA])
@pytest.mark.parametrize("n", [1, 16, 17, 1000])
def test_ans_coder_round_trip(alpha, n):
    rng = np.random.default_rng(alpha * 1000 + n)
    p = rng.dirichlet(np.full(alpha, 0.2))  # skewed, most symbols rare or absent
    sym = rng.choice(alpha, size=n, p=p)
    out = arith.decode(arith.encode(sym, alpha), alpha, n)
    assert np.array_equal(out, sym)
    assert out.dtype == (np.uint8 if alpha <= 256 else np.uint16)
    data = arith.encode(sym, alpha)
    for bad in (data[:-4], data[4:], data + b"\x01\x00\x00\x00"):
        if bad and np.count_nonzero(sym):  # all zeros code to no words at all (see arith.decode)
            try:  # refused, or (an empty coder decodes zeros) other symbols of the alphabet
                out = arith.decode(bad, alpha, n)
                assert not np.array_equal(out, sym) and len(out) == n and int(out.max()) < alpha
            except ValueError as e:
                assert "not the coding" in str(e) or "invalid" in str(e)


def test_ans_coder_adapts_to_a_skewed_stream():
    """95% zeros: close to the entropy (0.29 bits a symbol), where Huffman must spend 1 bit on each."""
    sym = (np.random.default_rng(0).random(20_000) < 0.05).astype(np.int64)
    data = arith.encode(sym, 2)
    h = 20_000 * -(0.05 * np.log2(0.05) + 0.95 * np.log2(0.95)) / 8
    assert len(data) < 1.05 * h + 64
    assert len(streams.encode_symbols(sym, 2, coder="huffman")[0]) > 2 * len(data)


@pytest.fixture(scope="module")
def pruned_kmeans(lenet5_trained):
    """The trained LeNet-5, its weights cut to the largest 10% by magnitude (threshold pruning without its
    search, which takes 10 s), then 4-bit k-means."""
    m = copy.deepcopy(lenet5_trained)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight"):
                p[p.abs() < p.abs().flatten().quantile(0.9)] = 0
    quantize_(m, QuantConfig(bits=4, scheme="kmeans"))
    return m


def _streams(manifest):
    """Every stream's fields in a manifest: values, and the index's own stream where it has one."""
    for e in manifest["tensors"]:
        if "values" in e:
            yield e["values"]
        idx = e.get("index")
        if isinstance(idx, dict) and "stream" in idx:
            yield idx["stream"]


def _codes(model):
    return {
        n: get_state(mod, "weight").codes.clone()
        for n, mod in model.named_modules()
        if get_state(mod, "weight") is not None
    }


def test_real_tensors_round_trip_exactly_and_auto_is_never_larger(pruned_kmeans):
    m = pruned_kmeans
    files = {coder: encode_model(copy.deepcopy(m), coder=coder) for coder in ("huffman", "auto", "context")}
    want = m.state_dict()
    codes = _codes(m)
    for coder, (blob, _) in files.items():
        back = decode_model(blob)
        got = back.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), coder
        assert all(torch.equal(codes[k], c) for k, c in _codes(back).items()), coder
    sections = {coder: {e["name"]: e["length"] for e in st["tensors"]} for coder, (_, st) in files.items()}
    for name, n in sections["huffman"].items():
        assert sections["auto"][name] <= n, name  # each section the smaller of the two
    assert len(files["auto"][0]) < len(files["huffman"][0])  # and the ANS coder wins somewhere
    codings = {f["coding"] for f in _streams(unpack(files["auto"][0])[0]) if f["count"]}
    assert "ans" in codings
    ctx = unpack(files["context"][0])[0]
    assert all(f["coding"] == "ans" for f in _streams(ctx) if f["count"])
    assert all(e["index"]["index"] in ("gaps", "sig") for e in ctx["tensors"] if "index" in e)


def test_auto_leaves_a_long_stream_to_the_fast_decoder(monkeypatch):
    """A stream over ``ANS_AUTO_MAX`` symbols is Huffman coded under ``auto`` even where ANS is smaller (ANS
    decodes ~7x slower); ``context`` still codes it with ANS, and a shorter one still gets the smaller coding."""
    rng = np.random.default_rng(0)
    sym = (rng.random(4000) < 0.05).astype(np.int64) * rng.integers(1, 16, 4000)  # ANS wins on it by far
    mask = rng.random(4000) < 0.05
    assert streams.encode_symbols(sym, 16, coder="auto")[1]["coding"] == "ans"
    assert streams.encode_index(mask, coder="auto")[1]["index"] == "sig"
    monkeypatch.setattr(streams, "ANS_AUTO_MAX", 3999)
    assert streams.encode_symbols(sym, 16, coder="auto")[1]["coding"] == "huff"
    assert streams.encode_index(mask, coder="auto")[1]["index"] != "sig"
    assert streams.encode_symbols(sym, 16, coder="context")[1]["coding"] == "ans"
    assert streams.encode_index(mask, coder="context")[1]["index"] == "sig"


def test_huffman_coder_writes_the_bytes_of_before(pruned_kmeans, tmp_path, cli):
    """``huffman``: no stream of the ANS coder, and a Huffman file re-encoded is the same bytes; the CLI's
    --coder huffman writes exactly what the library does."""
    blob, _ = encode_model(copy.deepcopy(pruned_kmeans), coder="huffman")
    manifest, _ = unpack(blob)
    assert not any(f["coding"] == "ans" for f in _streams(manifest))
    assert not any(e.get("index", {}).get("index") == "sig" for e in manifest["tensors"])
    again, _ = encode_model(decode_model(blob), coder="huffman")
    assert again == blob
    (tmp_path / "h.cpz").write_bytes(blob)
    res = cli("encode", tmp_path / "h.cpz", "--coder", "huffman", "-o", tmp_path / "h2.cpz")
    assert res.code == 0, res
    assert (tmp_path / "h2.cpz").read_bytes() == blob
    res = cli("encode", tmp_path / "h.cpz", "--coder", "zstd", "-o", tmp_path / "h3.cpz")
    assert res.code != 0 and not (tmp_path / "h3.cpz").exists()


# ------------------------------------------------------------------ hostile ANS-coded sections
def _ac_entry(manifest):
    """The first entry with a ANS-coded values stream, and its index in the manifest."""
    for i, e in enumerate(manifest["tensors"]):
        if e.get("values", {}).get("coding") == "ans":
            return i, e
    raise AssertionError("no ANS-coded stream")


def _hostile_files(blob, huffman_blob, tmp_path) -> dict:
    """name -> path of a .cpz whose checksums are right and whose ANS-coded section lies."""
    manifest, sections = unpack(blob)
    i, e = _ac_entry(manifest)
    start = e["params_bytes"] + e.get("index_bytes", 0)
    payload = sections[i][start:]
    cases = {}

    def case(name, edit=None, data=None):
        m = copy.deepcopy(manifest)
        s = list(sections)
        if edit is not None:
            edit(m["tensors"][i])
        if data is not None:
            s[i] = sections[i][:start] + data
            m["tensors"][i].pop("length")
        for t in m["tensors"]:
            t.pop("offset", None)
        path = tmp_path / f"{name}.cpz"
        path.write_bytes(forge(m, s))
        cases[name] = path

    case("count beyond the tensor", lambda t: t["values"].update(count=1 << 40))
    case("huge tensor, tiny stream", lambda t: t.update(shape=[1 << 30]) or t["values"].update(count=1 << 30))
    case("alphabet too large", lambda t: t["values"].update(alpha=1 << 20))
    case("alphabet that lies", lambda t: t["values"].update(alpha=2))
    case("not whole words", data=payload + b"\x01")
    case("far longer than its symbols", data=payload * (4 * e["values"]["count"] // len(payload) + 2))
    case("truncated to one word", data=payload[:4])
    case("unknown coding", lambda t: t["values"].update(coding="ac2"))
    # a significance map in place of a Huffman file's first sparse index: as written, and with a count that lies
    manifest, sections = unpack(huffman_blob)
    k, t = next((k, t) for k, t in enumerate(manifest["tensors"]) if "index" in t)
    ib, pb = t["index_bytes"], t["params_bytes"]
    mask = streams.decode_index(sections[k][pb : pb + ib], t["index"], int(np.prod(t["shape"])))
    sdata, sf = streams.encode_symbols(mask.astype(np.int64), 2, coder="context")
    for name, count in (("significance map", len(mask)), ("significance map of the wrong length", len(mask) + 1)):
        m = copy.deepcopy(manifest)
        m["tensors"][k].update(index_bytes=len(sdata), index={"index": "sig", "nnz": int(mask.sum())})
        m["tensors"][k]["index"]["stream"] = dict(sf, count=count)
        m["tensors"][k].pop("length")
        s = list(sections)
        s[k] = sections[k][:pb] + sdata + sections[k][pb + ib :]
        for e2 in m["tensors"]:
            e2.pop("offset", None)
        cases[name] = tmp_path / f"{name}.cpz"
        cases[name].write_bytes(forge(m, s))
    return cases


def test_hostile_ans_coded_sections_are_refused_in_one_line(pruned_kmeans, tmp_path):
    blob, _ = encode_model(copy.deepcopy(pruned_kmeans), coder="context")
    huffman, _ = encode_model(copy.deepcopy(pruned_kmeans), coder="huffman")
    cases = _hostile_files(blob, huffman, tmp_path)
    valid = decode_model(cases.pop("significance map").read_bytes())  # the forged map itself is sound
    want = pruned_kmeans.state_dict()
    assert all(torch.equal(want[n], v) for n, v in valid.state_dict().items())
    names = list(cases)
    ended, whole = run_cli_each([["decode", cases[n], "-o", tmp_path / f"{k}.pt"] for k, n in enumerate(names)])
    for name, r in zip(names, ended, strict=True):
        assert r.one_line_refusal, (name, r)
        assert "not a valid .cpz" in r.err or "refused" in r.err, (name, r)
        assert r.seconds < 10, (name, r)
    assert whole.peak_mb < 1000, whole
    assert not any(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("seed", range(6))
def test_bit_flipped_ans_coded_payloads_decode_or_are_refused(pruned_kmeans, seed):
    """A flipped bit inside a ANS-coded stream (checksums recomputed): a model, or a FormatError."""
    blob, _ = encode_model(copy.deepcopy(pruned_kmeans), coder="context")
    manifest, sections = unpack(blob)
    rng = np.random.default_rng(seed)
    s = [bytearray(x) for x in sections]
    for _ in range(3):
        k = int(rng.integers(len(s)))
        if s[k]:
            j = int(rng.integers(len(s[k])))
            s[k][j] ^= 1 << int(rng.integers(8))
    for t in manifest["tensors"]:
        t.pop("offset", None)
    try:
        decode_model(forge(manifest, [bytes(x) for x in s]))
    except FormatError:
        pass
