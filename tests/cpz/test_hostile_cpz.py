"""Hostile files and arguments: no code runs, no bomb goes off, nothing is lost.

Every file here is crafted by the test itself. Each case must end in one line on stderr, a
non-zero exit, nothing written, within a few seconds and without allocating what the file asks for.
"""

import copy
import io
import json
import os
import pickle
import resource
import struct
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress
from compress.cpz.container import HEAD, MAGIC, VERSION, decode_model, encode_model, read_manifest
from compress.errors import FormatError, InputError, UntrustedPickleError
from compress.meta import set_meta
from compress.model_io import save_model
from compress.models import create_model
from compress.quantize import QuantConfig, quantize_
from tests.helpers import Calls, mutated, one_line_error


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forge(manifest: dict, sections: list[bytes]) -> bytes:
    """A .cpz with every checksum right: only the structural checks stand between it and harm."""
    off = 0
    for e, data in zip(manifest["tensors"], sections, strict=False):
        e.setdefault("offset", off)
        e.setdefault("length", len(data))
        e["crc"] = zlib.crc32(data)
        off += len(data)
    mbytes = zlib.compress(json.dumps(manifest).encode())
    body = HEAD.pack(MAGIC, VERSION, 0, len(mbytes), zlib.crc32(mbytes)) + mbytes + b"".join(sections)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(blob: bytes) -> tuple[dict, list[bytes]]:
    """A .cpz's manifest and its tensor sections (they follow each other after the manifest)."""
    manifest, start = read_manifest(blob)
    ends = np.cumsum([0] + [e["length"] for e in manifest["tensors"]])
    return manifest, [blob[start + a : start + b] for a, b in zip(ends[:-1], ends[1:], strict=False)]


@pytest.fixture(scope="module")
def tiny_cpz():
    """A real small quantized model's .cpz: (blob, manifest, sections)."""
    torch.manual_seed(0)
    m = create_model("lenet300", input_size=4, num_classes=3)
    quantize_(m, QuantConfig(bits=4, scheme="kmeans"))
    blob, _ = encode_model(m)
    manifest, sections = unpack(blob)
    return blob, manifest, sections


def _refused_quickly(blob: bytes, match: str, calls: int = 200_000, mb: float = 500):
    """Refused before the work and the memory the file declares: counted in function calls, not seconds."""
    before = _peak_mb()
    with Calls() as c, pytest.raises(FormatError, match=match):
        decode_model(blob)
    assert c.n < calls, c.n
    assert _peak_mb() - before < mb  # the declared size was never allocated


# ------------------------------------------------------------------ code does not run
def test_torchscript_is_code_and_needs_trust(tmp_path, cli):
    class Net(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    torch.jit.save(torch.jit.script(Net()), tmp_path / "ts.pt")
    res = cli("report", tmp_path / "ts.pt", "--input-shape", "1,1,28,28", "--no-latency")
    assert one_line_error(res) and "TorchScript is code" in res.err and "--trust-pickle" in res.err
    res = cli("report", tmp_path / "ts.pt", "--input-shape", "1,1,28,28", "--no-latency", "--trust-pickle")
    assert res.code == 0, res.err


def _torch_file_with_pickle(path, payload: bytes) -> None:
    """A torch.save zip whose data.pkl is ``payload``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)


def test_an_allowed_class_cannot_be_called_with_the_files_arguments(tmp_path, cli):
    class Big:
        def __reduce__(self):  # what a 401-byte file can ask for: Linear(45000, 45000), 8 GB
            return torch.nn.Linear, (45000, 45000)

    torch.save(Big(), tmp_path / "big.pt")
    assert (tmp_path / "big.pt").stat().st_size < 2000
    before = _peak_mb()
    res = cli("report", tmp_path / "big.pt", "--input-shape", "1,45000", "--no-latency")
    assert one_line_error(res) and "constructor" in res.err and "--trust-pickle" in res.err
    assert _peak_mb() - before < 500


def test_a_file_cannot_make_compress_import_a_module(tmp_path):
    name = "torch.utils.model_dump.__main__"
    payload = b"\x80\x02c" + name.encode() + b"\nX\nq\x00)\x81q\x01."  # GLOBAL, NEWOBJ
    _torch_file_with_pickle(tmp_path / "imp.pt", payload)
    was = name in sys.modules
    with pytest.raises(UntrustedPickleError):
        compress.load_model(tmp_path / "imp.pt")
    assert (name in sys.modules) == was  # nothing was imported (its import calls sys.exit)


def test_system_exit_never_escapes(tmp_path, lenet5_trained):
    torch.save(lenet5_trained.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\ndef f():\n    pass\n")
    with pytest.raises(InputError, match="exit"):
        compress.load_model(tmp_path / "sd.pt", arch=f"{tmp_path / 'quits.py'}:f")
    with pytest.raises(InputError, match="exit"):
        compress.data.load(f"{tmp_path / 'quits.py'}:f")


# ------------------------------------------------------------------ bombs in a .cpz
def test_a_tiny_section_cannot_declare_a_huge_tensor(tiny_cpz):
    _, manifest, _ = tiny_cpz
    bomb = {
        **copy.deepcopy(manifest),
        "tensors": [
            {
                "name": "fc1.weight",
                "shape": [1 << 28],
                "dtype": "float32",
                "enc": "sparse_raw",
                "index_bytes": 6,
                "index": {
                    "index": "gaps",
                    "nnz": 0,
                    "stream": {"coding": "packed", "alpha": 256, "count": 0, "width": 8, "fixed_bytes": 0},
                },
            }
        ],
    }
    _refused_quickly(forge(bomb, [b"\x00" * 6]), "COMPRESS_MAX_DECODE_RATIO")


def test_sections_cannot_overlap_or_repeat(tiny_cpz):
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    first = m["tensors"][0]
    m["tensors"] = [dict(first, name=f"t{i}", offset=0) for i in range(5000)]  # all pointing at one section
    _refused_quickly(forge(m, [sections[0]]), "overlapping|lies outside|more decoded data")


def test_many_huffman_streams_cannot_take_minutes(tiny_cpz):
    """The issue's 523 KB file of tiny Huffman streams: work is bounded by what the file can justify."""
    from compress.coding import streams

    _, manifest, _ = tiny_cpz
    sym = np.zeros(300, dtype=np.int64)
    sym[::37] = np.arange(len(sym[::37])) % 4 + 1  # skewed: Huffman beats packing
    data, fields = streams.encode_symbols(sym, 5)
    assert fields["coding"] == "huff"
    cb = np.linspace(-1, 1, 4).astype("<f4").tobytes()
    entry = {
        "shape": [300],
        "dtype": "float32",
        "enc": "codebook",
        "bits": 2,
        "k": 4,
        "mode": "dense",
        "params_bytes": len(cb),
        "values": fields,
    }
    n = 8500
    many = {**copy.deepcopy(manifest), "tensors": [dict(copy.deepcopy(entry), name=f"t{i}") for i in range(n)]}
    blob = forge(many, [cb + data] * n)
    assert len(blob) < 600_000
    _refused_quickly(blob, "work", calls=250 * n)  # checking each entry's fields, not decoding its stream
    over = {**copy.deepcopy(manifest), "tensors": [dict(copy.deepcopy(entry), name=f"t{i}") for i in range(25_000)]}
    _refused_quickly(forge(over, [cb + data] * 25_000), "too many tensors")


def test_stored_input_shape_is_not_trusted(tmp_path, cli):
    for shape in ([1, 1, 6000, 6000], ["a", 2], [1, -3, 4], [1]):
        m = create_model("lenet300", input_size=4, num_classes=3)
        set_meta(m, input_shape=shape)
        p = tmp_path / f"s{len(os.listdir(tmp_path))}.cpz"
        save_model(m, p)
        before = _peak_mb()
        res = cli("report", p, "--no-latency")
        assert one_line_error(res) and "input shape" in res.err, (shape, res.err)
        assert _peak_mb() - before < 500
    res = cli("report", p, "--input-shape", "1,1,100000,100000")
    assert one_line_error(res) and res.code == 2


# ------------------------------------------------------------------ malformed fields
@pytest.mark.parametrize(
    "field,value",
    [
        ("values", 5),
        ("values", "x"),
        ("values", [1]),
        ("values", {"coding": "huff"}),
        ("shape", [1 << 40, 1 << 40]),
        ("shape", "7"),
        ("bits", "4"),
        ("enc", ["uniform"]),
        ("mode", None),
        ("k", 10**9),
    ],
)
def test_fields_of_the_wrong_type_are_format_errors(tiny_cpz, field, value):
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    coded = next(e for e in m["tensors"] if e.get("enc") == "codebook")
    coded[field] = value
    for e in m["tensors"]:
        e.pop("offset", None), e.pop("length", None)
    with pytest.raises(FormatError):
        decode_model(forge(m, sections))


def test_a_coded_tensor_of_no_layer_is_a_format_error(tiny_cpz):
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    coded = next(e for e in m["tensors"] if e.get("enc") == "codebook")
    coded["name"] = "ghost.weight"
    for e in m["tensors"]:
        e.pop("offset", None), e.pop("length", None)
    with pytest.raises(FormatError):
        decode_model(forge(m, sections))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: np.savez(p, x=np.array(["a", "b"]), y=np.array([0, 1])), "dtype"),
        (lambda p: np.savez(p, x=np.zeros((2, 1, 4, 4), np.float32), y=np.array([0, 2**63], np.uint64)), "labels"),
    ],
)
def test_data_files_with_wrong_dtypes(tmp_path, make, match):
    make(tmp_path / "d.npz")
    with pytest.raises(InputError, match=match):
        compress.data.load(str(tmp_path / "d.npz"))


def test_npz_header_declaring_a_huge_array(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 4, 4), np.float32), y=np.zeros(2, np.int64))
    with zipfile.ZipFile(tmp_path / "d.npz") as z:
        members = {n: z.read(n) for n in z.namelist()}
    x = members["x.npy"]
    header = x[: x.index(b"}") + 1].replace(b"(2, 1, 4, 4)", b"(1000000000000000000,)")
    members["x.npy"] = header + x[x.index(b"}") + 1 :]
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    before = _peak_mb()
    with Calls() as c, pytest.raises(InputError, match="declares shape"):
        compress.data.load(str(tmp_path / "bomb.npz"))
    assert c.n < 200_000 and _peak_mb() - before < 100, c.n


def test_idx_header_with_overflowing_dims(tmp_path):
    (tmp_path / "mnist").mkdir()
    hdr = bytes([0, 0, 8, 3]) + b"".join(struct.pack(">I", 65536) for _ in range(3))
    (tmp_path / "mnist" / "t-images-idx3-ubyte").write_bytes(hdr + b"\x00" * 16)
    (tmp_path / "mnist" / "t-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(InputError, match="does not match its header|declares"):
        compress.data.load(str(tmp_path / "mnist"))


@pytest.mark.parametrize(
    "args",
    [
        ["zoo", "train", "lenet300", "--val-fraction", "1.5"],
        ["zoo", "train", "lenet5", "--width", "0"],
        ["report", "M", "--data", "digits?limit=0"],
        ["report", "M", "--data", "digits?size=-3"],
        ["report", "M", "--data", "digits?channels=-1"],
        ["report", "M", "--data", "digits?limit=-5"],
        ["pipeline", "M", "--train-data", "digits", "--max-accuracy-drop", "nan"],
        ["--device", "tpu", "report", "M"],
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, cli, args):
    m = create_model("lenet300", input_size=8)
    save_model(m, tmp_path / "m.pt")
    args = [str(tmp_path / "m.pt") if a == "M" else a for a in args]
    res = cli(*args, "-o", tmp_path / "out.pt") if args[0] in ("zoo", "pipeline") else cli(*args)
    assert one_line_error(res), res
    assert not (tmp_path / "out.pt").exists()


def test_dev_null_is_never_replaced(tmp_path, cli):
    m = create_model("lenet300", input_size=4, num_classes=3)
    save_model(m, tmp_path / "m.pt")
    before = os.stat("/dev/null")
    res = cli("encode", tmp_path / "m.pt", "-o", "/dev/null", "--force")
    assert one_line_error(res) and "regular file" in res.err
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_rdev, after.st_ino) == (before.st_mode, before.st_rdev, before.st_ino)


# ------------------------------------------------------------------ properties of the reader
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_are_decoded_or_refused_never_crash(tiny_cpz, data):
    def zero(b, i):
        b[i : i + 8] = b"\x00" * len(b[i : i + 8])

    blob = mutated(tiny_cpz[0], data, zero)
    with Calls() as c:
        try:
            decode_model(blob)
        except FormatError:
            pass
    assert c.n < 2_000_000, c.n


_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 1 << 40),
    st.text(max_size=8),
    st.lists(st.integers(-1, 1 << 20), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(0, 300), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_structurally_forged_files_are_refused_cleanly(tiny_cpz, data):
    """Valid checksums, forged manifest fields: a FormatError (or a model), never another exception."""
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        e = data.draw(st.sampled_from(m["tensors"]))
        # an earlier draw may have replaced "values" or "index" by a non-table: only tables take keys
        target = data.draw(st.sampled_from([t for t in (e, e.get("values"), e.get("index")) if isinstance(t, dict)]))
        key = data.draw(st.sampled_from(sorted(target) + ["shape", "alpha", "count", "nnz", "block", "parts"]))
        target[key] = data.draw(_FIELD_VALUES)
    for e in m["tensors"]:
        e.pop("offset", None), e.pop("length", None)
    with Calls() as c:
        try:
            decode_model(forge(m, sections))
        except FormatError:
            pass
    assert c.n < 2_000_000, c.n


def test_a_pickle_payload_is_still_refused_and_never_runs(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "p.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError):
        compress.load_model(tmp_path / "p.pt")
    assert not (tmp_path / "ran").exists()


def test_an_architecture_of_too_many_modules_is_refused(tiny_cpz):
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    leaf = {"class": "torch.nn.modules.linear.Identity", "attrs": {}, "params": {}, "buffers": {}, "children": {}}
    m["arch"] = {**m["arch"], "children": {**m["arch"]["children"], **{f"x{i}": leaf for i in range(50_001)}}}
    for e in m["tensors"]:
        e.pop("offset", None), e.pop("length", None)
    _refused_quickly(forge(m, sections), "modules", calls=50 * 50_001)  # counting the entries, building none


@pytest.mark.parametrize("fn", ["load", "save", "os.system", "__import__"])
def test_a_function_attribute_names_only_allow_listed_tensor_functions(tiny_cpz, fn):
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    m["arch"]["attrs"]["activation"] = {"fn": fn}
    for e in m["tensors"]:
        e.pop("offset", None), e.pop("length", None)
    with pytest.raises(FormatError, match="malformed attribute"):
        decode_model(forge(m, sections))


# ------------------------------------------------------------------ every reader counts before it pays
def test_an_idx_gzip_is_read_header_first(tmp_path):
    """A small gzip that unpacks to a lot: refused from its header, before (or without) unpacking it."""
    import gzip

    (tmp_path / "bad").mkdir()
    with gzip.open(tmp_path / "bad" / "t-images-idx3-ubyte.gz", "wb") as f:  # not IDX, 200 MB of zeros
        for _ in range(25):
            f.write(bytes(8 << 20))
    (tmp_path / "bad" / "t-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + b"\x00")
    big = tmp_path / "big"
    big.mkdir()
    with gzip.open(big / "t-images-idx3-ubyte.gz", "wb") as f:  # a true header of 200 MB, from 200 KB
        f.write(bytes([0, 0, 8, 3]) + b"".join(struct.pack(">I", d) for d in (255_102, 28, 28)))
        for _ in range(25):
            f.write(bytes(8 << 20))
    (big / "t-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + b"\x00")
    assert (big / "t-images-idx3-ubyte.gz").stat().st_size < 300_000
    for folder, match in ((tmp_path / "bad", "not an IDX"), (big, "declares 199,999,968 bytes")):
        before = _peak_mb()
        with Calls() as c, pytest.raises(InputError, match=match):
            compress.data.load(str(folder))
        assert c.n < 200_000 and _peak_mb() - before < 100, c.n


def _wrapped_user_model(tmp_path):
    from tests.archs import tiny_cnn

    m = tiny_cnn()
    set_meta(m, input_shape=[1, 1, 8, 8], arch_ref="tests.archs:tiny_cnn")
    save_model(m, tmp_path / "w.pt")
    return m, torch.load(tmp_path / "w.pt", weights_only=True)


def test_a_wrapped_cpz_holds_the_weights_once_and_an_old_state_dict_must_agree(tmp_path):
    m, obj = _wrapped_user_model(tmp_path)
    assert set(obj) == {"compress_cpz"}
    loaded = compress.load_model(tmp_path / "w.pt", arch="tests.archs:tiny_cnn")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    torch.save({**obj, "state_dict": sd}, tmp_path / "agree.pt")  # as an older compress wrote it
    assert torch.equal(
        compress.load_model(tmp_path / "agree.pt", arch="tests.archs:tiny_cnn")(torch.ones(1, 1, 8, 8)),
        loaded(torch.ones(1, 1, 8, 8)),
    )
    k = next(iter(sd))
    sd[k] = sd[k] + 1  # another tool reads the state_dict, compress the .cpz: they may not disagree
    torch.save({**obj, "state_dict": sd}, tmp_path / "disagree.pt")
    with pytest.raises(InputError, match="disagree"):
        compress.load_model(tmp_path / "disagree.pt", arch="tests.archs:tiny_cnn")


def test_a_deflated_tensor_in_a_torch_file_is_refused_before_torch_unpacks_it(tmp_path, cli):
    """80 MB of zeros deflated into a ~100 KB torch file beside a real .cpz: refused from the zip's
    directory, before torch allocates it."""
    _, obj = _wrapped_user_model(tmp_path)
    torch.save({**obj, "state_dict": {"w": torch.zeros(20 << 20)}}, tmp_path / "plain.pt")
    with (
        zipfile.ZipFile(tmp_path / "plain.pt") as src,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    (tmp_path / "plain.pt").unlink()
    assert (tmp_path / "bomb.pt").stat().st_size < 500_000
    before = _peak_mb()
    res = cli("report", tmp_path / "bomb.pt", "--arch", "tests.archs:tiny_cnn", "--no-latency")
    assert one_line_error(res) and "unpack to" in res.err and "COMPRESS_MAX_DECODE_RATIO" in res.err
    assert _peak_mb() - before < 60


def test_strings_from_a_file_are_printed_escaped_and_never_as_an_arch_to_run(tiny_cpz, tmp_path, cli):
    """A forged class reference with terminal escape sequences, and an arch_ref naming an attacker's
    file: the one-line error shows the former escaped and suggests neither."""
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    m["arch"]["ref"] = "\x1b]0;pwned\x07\x1b[31mevil.Net"
    m["arch"]["attrs"]["compress_meta"] = {"d": {"arch_ref": "/tmp/evil.py:build"}}
    (tmp_path / "e.cpz").write_bytes(forge(m, sections))
    res = cli("report", tmp_path / "e.cpz", "--no-latency")
    assert one_line_error(res) and "\x1b" not in res.err and "\x07" not in res.err and "\\x1b" in res.err
    assert "evil.py" not in res.err and "--arch module:callable" in res.err


def test_a_recipe_cannot_name_a_function(tmp_path, cli, lenet5_trained):
    save_model(lenet5_trained, tmp_path / "m.pt")
    (tmp_path / "r.toml").write_text(
        '[[stage]]\nmethod = "threshold"\nsparsity = 0.5\nselect = { filter_fn = "os.system" }\n'
    )
    res = cli(
        "pipeline",
        tmp_path / "m.pt",
        "--recipe",
        tmp_path / "r.toml",
        "--train-data",
        "digits",
        "-o",
        tmp_path / "o.cpz",
    )
    assert one_line_error(res) and "filter_fn" in res.err and not (tmp_path / "o.cpz").exists()


def test_a_manifest_that_declares_too_much_is_refused_before_any_section_is_decoded(tiny_cpz):
    """Many entries, each small enough alone, that together declare more than the file can hold: the
    budget is charged from the manifest first (it had been charged as decoding went: 50 s, 6 GB)."""
    _, manifest, sections = tiny_cpz
    m = copy.deepcopy(manifest)
    first = m["tensors"][0]
    m["tensors"] = [dict(first, name=f"t{i}", shape=[1 << 24]) for i in range(200)] + m["tensors"][1:]
    _refused_quickly(forge(m, sections), "more decoded data", mb=50)
