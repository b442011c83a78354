import copy
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.coding import huffman as H
from compress.coding import streams
from compress.config import FineTune
from compress.cpz.container import encode_model, load_cpz, save_cpz
from compress.errors import FormatError
from compress.model_io import save_model
from compress.models import create_model
from compress.prune import ThresholdConfig, prune_
from compress.quant_state import get_state
from compress.quantize import QuantConfig, quantize_
from tests.helpers import Calls, one_line_error


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(_bits(sa[k]), _bits(sb[k])), k


# ------------------------------------------------------------------ Huffman
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_huffman_roundtrip_random_distributions(data):
    alpha = data.draw(st.integers(1, 300))
    n = data.draw(st.integers(0, 3000))
    weights = np.array(data.draw(st.lists(st.floats(0.001, 1.0), min_size=alpha, max_size=alpha)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    sym = rng.choice(alpha, size=n, p=weights / weights.sum()) if n else np.zeros(0, np.int64)
    block = data.draw(st.sampled_from([1, 7, 64, 512]))
    freqs = np.bincount(sym, minlength=alpha)
    lengths = H.code_lengths(freqs)
    assert lengths.max(initial=0) <= H.MAX_LEN
    H.check_lengths(lengths)
    payload, bb = H.encode(sym, lengths, block)
    assert np.array_equal(H.decode(payload, lengths, n, bb, block), sym)


def test_huffman_edge_cases():
    for sym in (np.zeros(0, np.int64), np.zeros(1, np.int64), np.full(1000, 3), np.arange(5)):
        f = np.bincount(sym, minlength=4)
        L = H.code_lengths(f)
        p, bb = H.encode(sym, L, 64)
        assert np.array_equal(H.decode(p, L, len(sym), bb, 64), sym)


def test_length_limit_on_fibonacci_frequencies():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    L = H.code_lengths(np.array(fib))
    assert L.max() == H.MAX_LEN
    H.check_lengths(L)
    sym = np.repeat(np.arange(40), 3)
    p, bb = H.encode(sym, L, 16)
    assert np.array_equal(H.decode(p, L, len(sym), bb, 16), sym)


def test_huffman_near_entropy():
    rng = np.random.default_rng(0)
    sym = np.clip(np.round(rng.laplace(128, 6, 200_000)), 0, 255).astype(np.int64)
    f = np.bincount(sym, minlength=256)
    p = f[f > 0] / f.sum()
    entropy = -(p * np.log2(p)).sum()
    assert H.encoded_bits(f, H.code_lengths(f)) / f.sum() < entropy * 1.01 + 0.01


def test_decoder_rejects_corrupt_stream():
    sym = np.arange(100) % 7
    L = H.code_lengths(np.bincount(sym))
    p, bb = H.encode(sym, L, 32)
    bad = bytearray(p)
    bad[3] ^= 0xFF
    try:  # a complete prefix code may re-synchronise: then the symbols differ (the CRC catches it)
        assert not np.array_equal(H.decode(bytes(bad), L, 100, bb, 32), sym)
    except ValueError:
        pass
    with pytest.raises(ValueError):
        H.decode(p[:-1], L, 100, bb, 32)
    wrong_sync = bb.copy()
    wrong_sync[0] += 1
    wrong_sync[1] -= 1
    with pytest.raises(ValueError):
        H.decode(p, L, 100, wrong_sync, 32)


@pytest.mark.parametrize("alpha", [17, 256, 257])
@pytest.mark.parametrize("block,n", [(512, 512 * 600), (512, 512 * 600 - 77), (7, 7 * 40_000 + 3)])
def test_huffman_long_streams_decode_exactly(alpha, block, n):
    """Streams long enough for the 16-bit lookup, skewed so that some groups of symbols overrun one
    window; a short last block, blocks that are no multiple of the symbols a lookup yields, and
    alphabets that need one or two bytes a symbol."""
    rng = np.random.default_rng(alpha + n)
    sym = np.clip(np.round(rng.laplace(alpha / 2, alpha / 12, n)), 0, alpha - 1).astype(np.int64)
    lengths = H.code_lengths(np.bincount(sym, minlength=alpha))
    payload, bb = H.encode(sym, lengths, block)
    out = H.decode(payload, lengths, n, bb, block)
    assert out.dtype == (np.uint8 if alpha <= 256 else np.uint16)
    assert np.array_equal(out, sym)
    relabel = (np.arange(alpha) * 7 % 251).astype(np.uint8)
    assert np.array_equal(H.decode(payload, lengths, n, bb, block, relabel=relabel), relabel[sym])


def test_huffman_relabel_on_incomplete_codes_and_packed_streams():
    sym = np.full(3000, 2)  # one symbol: the code "0" covers half the windows
    data, f = streams.encode_symbols(sym, 5)
    relabel = np.array([9, 8, 255, 6, 5], dtype=np.uint8)
    assert f["coding"] == "huff"
    assert np.array_equal(streams.decode_symbols(data, f, 3000, relabel=relabel), relabel[sym])
    flat = np.arange(3000) % 4  # uniform over a power of two: packed beats Huffman
    data, f = streams.encode_symbols(flat, 4)
    assert f["coding"] == "packed"
    assert np.array_equal(streams.decode_symbols(data, f, 3000, relabel=relabel[:4]), relabel[flat])


@pytest.mark.parametrize("n", [8, 400_000])  # a short stream and a long one (decoded another way)
def test_a_bit_pattern_no_code_matches_is_refused(n):
    """One symbol has the code 0 and no code starts with 1: a 1 anywhere is corrupt, even where the
    sync points add up (one bit a symbol)."""
    lengths = np.array([0, 1, 0])
    payload, bb = H.encode(np.ones(n, dtype=np.int64), lengths, 512)
    assert np.array_equal(H.decode(payload, lengths, n, bb, 512), np.ones(n))
    bad = bytearray(payload)
    bad[len(bad) // 2] |= 0x10
    with pytest.raises(ValueError, match="corrupt Huffman stream"):
        H.decode(bytes(bad), lengths, n, bb, 512)


@pytest.mark.parametrize("n", [3000, 400_000])
def test_corrupt_long_and_short_streams_are_refused_or_differ(n):
    rng = np.random.default_rng(n)
    sym = np.clip(np.round(rng.laplace(8, 2, n)), 0, 16).astype(np.int64)
    lengths = H.code_lengths(np.bincount(sym, minlength=17))
    payload, bb = H.encode(sym, lengths, 512)
    for i in (0, len(payload) // 3, len(payload) - 1):
        bad = bytearray(payload)
        bad[i] ^= 0x5A
        try:  # a complete code re-synchronises: the symbols differ (the section's CRC catches it)
            assert not np.array_equal(H.decode(bytes(bad), lengths, n, bb, 512), sym)
        except ValueError:
            pass
    if len(bb) > 1:
        shifted = bb.copy()
        shifted[0] += 1
        shifted[1] -= 1
        with pytest.raises(ValueError):
            H.decode(payload, lengths, n, shifted, 512)


# ------------------------------------------------------------------ index streams
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("n", [1, 7, 4001])
def test_index_roundtrip(sparsity, n):
    rng = np.random.default_rng(n)
    mask = rng.random(n) >= sparsity
    data, f = streams.encode_index(mask)
    assert np.array_equal(streams.decode_index(data, f, n), mask)
    if sparsity >= 0.999 and n > 1000:
        assert f["index"] == "gaps" and len(data) < n // 8  # far smaller than a bitmask


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=2000), st.integers(0, 2000))
def test_gap_fillers_roundtrip(bits, jump):
    mask = np.array(bits + [False] * jump + [True], dtype=bool)
    pos = np.nonzero(mask)[0]
    assert np.array_equal(streams.positions_of(streams.gaps_of(pos)), pos)


# ------------------------------------------------------------------ container
@pytest.mark.parametrize(
    "scheme,bits,affine",
    [("minmax", 8, False), ("mmse", 4, False), ("kmeans", 4, False), ("minmax", 3, True), ("mmse", 5, False)],
)
@pytest.mark.parametrize("sparsity", [None, 0.9])
def test_container_roundtrip_bit_identical(lenet5_trained, scheme, bits, affine, sparsity):
    m = copy.deepcopy(lenet5_trained)
    if sparsity:
        prune_(m, ThresholdConfig(sparsity=sparsity, rounds=1, finetune=FineTune(epochs=0)))
    quantize_(m, QuantConfig(bits=bits, scheme=scheme, symmetric=not affine))
    blob, _ = encode_model(m)
    from compress.cpz.container import decode_model

    d = decode_model(blob)
    assert_identical(m, d)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(m(x), d(x))
    for name, mod in d.named_modules():  # decoded model can be re-encoded: its grids travel
        for param in ("weight", "bias"):
            if get_state(mod, param) is not None:
                assert torch.equal(get_state(mod, param).codes, get_state(dict(m.named_modules())[name], param).codes)
    assert get_state(d.fc1, "bias") is not None and torch.equal(d.fc1.bias, m.fc1.bias)


def test_biases_on_an_8_bit_grid_or_kept_float(lenet5_trained):
    from compress.cpz.container import decode_model

    sizes = {}
    for bias_bits in (None, 8):
        m = copy.deepcopy(lenet5_trained)
        quantize_(m, QuantConfig(bits=4, scheme="kmeans", bias_bits=bias_bits))
        b = lenet5_trained.fc1.bias.detach()
        if bias_bits is None:
            assert torch.equal(m.fc1.bias, b) and get_state(m.fc1, "bias") is None
        else:
            step = float(b.abs().max()) / 127
            assert float((m.fc1.bias.detach() - b).abs().max()) <= step / 2 + 1e-7
            assert len(torch.unique(m.fc1.bias)) <= 255
        blob, _ = encode_model(m)
        sizes[bias_bits] = len(blob)
        assert torch.equal(decode_model(blob).fc1.bias, m.fc1.bias)
    assert sizes[None] - sizes[8] > 3 * (20 + 50 + 500 + 10) * 0.9  # ~3 of every 4 bias bytes saved


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_small", "squeezenet_small"])
def test_container_unquantized_and_other_archs(name):
    torch.manual_seed(0)
    m = create_model(name).eval()
    from compress.cpz.container import decode_model

    d = decode_model(encode_model(m)[0])
    assert_identical(m, d)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(m(x), d(x))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_transformer_layer_is_stored_as_data(activation):
    """nn.TransformerEncoderLayer holds its activation as a function attribute (F.relu): stored by
    name from an allow-list of torch.nn.functional's tensor functions, and nothing else."""
    import torch.nn as nn
    import torch.nn.functional as F

    from compress.cpz.container import decode_model

    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, activation=activation, batch_first=True)
    ).eval()
    d = decode_model(encode_model(m)[0])
    assert d[1].activation is getattr(F, activation)
    x = torch.randn(3, 5, 8)
    assert torch.equal(m(x), d(x))


def test_per_tensor_and_odd_int4(lenet5_trained):
    m = create_model("lenet300", input_size=3, num_classes=3)  # odd tensor sizes
    quantize_(m, QuantConfig(bits=4, scheme="minmax", per_channel=False))
    from compress.cpz.container import decode_model

    assert_identical(m, decode_model(encode_model(m)[0]))


def test_int8_size_near_entropy(lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=8))
    blob, _ = encode_model(m)
    value_entropy = code_entropy = 0.0
    for mod in m.modules():
        for pname, t in mod.named_parameters(recurse=False):
            if pname == "weight" and get_state(mod) is not None:
                c = get_state(mod).codes.flatten().numpy()
            else:
                c = t.detach().flatten().numpy()
            _, cnt = np.unique(c, return_counts=True)
            h = float(-(cnt * np.log2(cnt / cnt.sum())).sum() / 8)
            code_entropy += h
            _, cv = np.unique(t.detach().numpy(), return_counts=True)
            value_entropy += float(-(cv * np.log2(cv / cv.sum())).sum() / 8)
    assert len(blob) <= 1.03 * value_entropy + 6000
    assert len(blob) <= 1.03 * code_entropy + 6000  # and against the codes themselves
    assert 4 * 431_080 / len(blob) >= 3.6


def _corruptions(blob: bytes):
    rng = np.random.default_rng(0)
    n = len(blob)
    out = {}
    for frac in (0.0, 0.001, 0.01, 0.25, 0.5, 0.75, 0.99):
        out[f"trunc{frac}"] = blob[: int(n * frac)]
    out["trunc-1"] = blob[:-1]
    for i, pos in enumerate([0, 5, 9, 13, 20, n // 3, n // 2, n - 100, n - 2]):
        b = bytearray(blob)
        b[pos] ^= 1 << (i % 8)
        out[f"flip{pos}"] = bytes(b)
    out["zeros"] = bytes(n)
    out["random"] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    out["random-with-magic"] = b"CPZ\x00" + rng.integers(0, 256, n - 4, dtype=np.uint8).tobytes()
    absurd = bytearray(blob)
    absurd[8:12] = (2**32 - 1).to_bytes(4, "little")
    out["absurd-length"] = bytes(absurd)
    version = bytearray(blob)
    version[4:6] = (99).to_bytes(2, "little")
    out["unknown-version"] = bytes(version)
    return out


def test_corrupt_files_rejected_cleanly(tmp_path, cli, lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    prune_(m, ThresholdConfig(sparsity=0.8, rounds=1, finetune=FineTune(epochs=0)))
    quantize_(m, QuantConfig(bits=4, scheme="kmeans"))
    save_cpz(m, tmp_path / "good.cpz")
    blob = (tmp_path / "good.cpz").read_bytes()
    cases = _corruptions(blob)
    assert len(cases) >= 22
    for name, data in cases.items():
        src = tmp_path / f"{name}.cpz"
        src.write_bytes(data)
        with Calls() as c:
            res = cli("decode", src, "-o", tmp_path / f"{name}.pt")
        assert c.n < 1_000_000, (name, c.n)  # refused before any tensor is decoded
        assert one_line_error(res), (name, res)
        assert not (tmp_path / f"{name}.pt").exists(), name
    with pytest.raises(FormatError):
        load_cpz(tmp_path / "flip13.cpz")


def test_crafted_file_with_valid_checksums_is_still_checked(lenet5_trained):
    """A file whose CRCs were recomputed after tampering is caught by the structural checks."""
    import json
    import struct

    from compress.cpz import container as C

    blob, _ = encode_model(copy.deepcopy(lenet5_trained))
    manifest, start = C.read_manifest(blob)
    manifest["arch"]["class"] = "os.system"  # tries to name foreign code
    for bad in (manifest, {**manifest, "tensors": [{**manifest["tensors"][0], "length": 10**12}]}):
        mb = zlib.compress(json.dumps(bad).encode())
        body = C.HEAD.pack(C.MAGIC, 1, 0, len(mb), zlib.crc32(mb)) + mb + blob[start:-4]
        forged = body + struct.pack("<I", zlib.crc32(body))
        with pytest.raises(FormatError):
            C.decode_model(forged)


def test_encode_decode_cli(tmp_path, cli, lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    quantize_(m, QuantConfig(bits=4, scheme="mmse"))
    save_model(m, tmp_path / "q.pt")
    res = cli("encode", tmp_path / "q.pt", "-o", tmp_path / "q.cpz")
    assert res.code == 0, res.err
    assert "smaller" in res.out and "coding gain" in res.out
    res = cli("decode", tmp_path / "q.cpz", "-o", tmp_path / "d.pt")
    assert res.code == 0, res.err
    from compress.model_io import load_model

    assert_identical(m, load_model(tmp_path / "d.pt"))
    rep = cli("report", tmp_path / "q.cpz", "--no-latency", "--json", "-")
    import json

    r = json.loads(rep.out)
    assert r["ratio_vs_dense_fp32"] > 7 and r["params"] == 431_080
