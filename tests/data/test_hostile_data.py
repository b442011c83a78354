"""Hostile data files, as an attacker makes them, through the real CLI in a child process under a memory cap
and a timeout (``tests/hostile_harness.py``): deflate bombs and lying headers in ``.npz`` and ``.npy``,
pickled arrays, too many members, FIFOs, devices and sockets named like images, links that loop or lead
out of their folder, images that declare 10^10 pixels, truncated files, huge IDX dimensions.

Each case ends in one line on stderr and a non-zero exit, or in a bounded run; never a traceback, a hang
or an allocation of what the file asks for. Cases share a child (``_cases``): importing torch costs ~3 s.
"""

import io
import os
import re
import socket
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from compress.data import files as files_mod
from compress.data import npy as npy_mod
from compress.errors import CompressError
from compress.meta import set_meta
from compress.model_io import save_model
from compress.models import create_model
from tests.helpers import mutated
from tests.hostile_harness import CAP_MB, CPU_S, Ended, run_cli, run_cli_each, run_python

MEASURED: dict[str, Ended] = {}  # every case's numbers, printed with ``pytest -s`` (the report quotes them)


def _cases(cases: dict[str, list], setup: str = "") -> dict[str, Ended]:
    """Each ``compress ARGS`` of ``cases`` run by ``main()`` in one capped child, in order; how each ended
    (its stderr alone; its peak is the child's peak so far, an upper bound for the case)."""
    code = (
        "import contextlib, io, json, resource, time\n"
        "from compress.cli import main\n"
        + setup
        + f"cases = { ({k: [str(a) for a in v] for k, v in cases.items()})!r}\n"
        "ended = {}\n"
        "for label, args in cases.items():\n"
        "    err, t0 = io.StringIO(), time.process_time()\n"
        "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
        "        rc = main(args)\n"
        "    ended[label] = [rc, err.getvalue(), time.process_time() - t0,\n"
        "                    _peak_kb() / 1024]\n"
        "print('@cases ' + json.dumps(ended))\n"
    )
    r = run_python(code, cpu_s=CPU_S * max(1, len(cases)))
    assert r.code == 0 and "@cases " in r.out, r
    raw = __import__("json").loads(r.out.split("@cases ", 1)[1])
    out = {k: Ended(rc, "", err, secs, peak) for k, (rc, err, secs, peak) in raw.items()}
    MEASURED.update(out)
    print(f"\nchild: {r.seconds:.1f} CPU s, {r.peak_mb:.0f} MB peak")
    for k, e in out.items():
        print(f"  {k:40s} {e.seconds:6.2f} s {e.peak_mb:6.0f} MB  {e.err.strip()[:150]}")
    return out


def _refused(e: Ended, *words: str) -> bool:
    return e.one_line_refusal and all(w in e.err for w in words) and e.seconds < CPU_S and e.peak_mb < CAP_MB / 2


# ----------------------------------------------------------------------------- files made by hand
def npy_bytes(shape, descr="<f4", data=b"", fortran=False, text=None) -> bytes:
    """A .npy: version 1.0 header (``text`` instead of the dict when given), then ``data``."""
    text = text if text is not None else repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    raw = text.encode("latin-1") if isinstance(text, str) else text
    pad = 64 - (10 + len(raw) + 1) % 64
    raw = raw + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data


def zip_bytes(members, comment=b"") -> bytes:
    """A zip written field by field, so that each field may lie. ``members``: dicts of ``name``, ``data``
    (the bytes as stored, compressed or not), ``method`` (0 stored, 8 deflated), and optionally
    ``size`` (the declared uncompressed size), ``crc``, ``flags``."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m["name"].encode() if isinstance(m["name"], str) else m["name"]
        data, method = m["data"], m.get("method", 0)
        size = m.get("size", len(data))
        crc = m.get("crc", zlib.crc32(data) if method == 0 else 0)
        flags = m.get("flags", 0)
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0, crc, len(data), size, len(name), 0)
        out += name + data
        central += (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                flags,
                method,
                0,
                0,
                crc,
                len(data),
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    n = len(members) % 65536  # the count fields are 16 bits (zipfile counts the directory itself)
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), len(out), len(comment)) + comment
    return bytes(out)


def deflated(head: bytes, zeros: int) -> bytes:
    """Raw deflate of ``head`` then ``zeros`` zero bytes, made in milliseconds whatever ``zeros`` is: after a
    full flush the compressor starts afresh, so each 16 MiB of zeros compresses to the same block."""
    chunk = 1 << 24
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH) if zeros >= chunk else b""
    return out + block * (zeros // chunk) + c.compress(bytes(zeros % chunk)) + c.flush()


def npz_member(name, arr_head, zeros, **kw) -> dict:
    return {"name": name, "data": deflated(arr_head, zeros), "method": 8, "size": len(arr_head) + zeros, **kw}


def png_bytes(w: int, h: int) -> bytes:
    """A PNG that declares ``w`` x ``h`` grey pixels and holds one row of them (truncated after)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def idx_bytes(dims, data=b"") -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + data


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = create_model("lenet5")
    set_meta(m, input_shape=[1, 1, 28, 28])
    p = tmp_path_factory.mktemp("model") / "lenet5.pt"
    save_model(m, p)
    return p


def _report(model, data):
    return ["report", model, "--data", data, "--no-latency"]


# ----------------------------------------------------------------------------- .npz
def test_npz_deflate_bomb_is_refused_before_it_is_decoded(tmp_path, model):
    """3.6 MB of deflate that declares (and holds) 3.7 GB of zeros: the attack, through the CLI as users run it."""
    n = 220 * (1 << 24)  # 3,690,987,520 bytes of uint8 images
    x = npy_bytes((n // 1024, 1, 32, 32), "|u1")
    y = npy_bytes((n // 1024,), "<i8")
    bomb = tmp_path / "bomb.npz"
    bomb.write_bytes(zip_bytes([npz_member("x.npy", x, n), npz_member("y.npy", y, 8 * (n // 1024))]))
    assert bomb.stat().st_size < 4_000_000
    e = run_cli(*_report(model, bomb))
    MEASURED["npz deflate bomb 3.6 MB -> 3.7 GB"] = e
    print(f"\nnpz deflate bomb: {e}")
    assert _refused(e, "refused", "declares 3,690,987,520 bytes", "COMPRESS_MAX_DECODE_RATIO"), e


def test_hostile_npz_files_are_refused_in_one_line(tmp_path, model):
    good_x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    gx, gy = npy_bytes(good_x.shape, "<f4", good_x.tobytes()), npy_bytes((4,), "<i8", np.arange(4).tobytes())
    ok = [{"name": "x.npy", "data": gx}, {"name": "y.npy", "data": gy}]
    pad = np.random.default_rng(1).bytes(4 << 20)  # 4 MB that do not compress: room in the file's budget
    lie = npy_bytes((100 << 20, 1, 2, 2), "<f4")
    files = {
        # a member that is a bomb by ratio in a file of honest bytes: 300 MB from ~300 KB, in a 4.3 MB file
        "member bomb by ratio": zip_bytes(
            [
                {"name": "pad.npy", "data": npy_bytes((len(pad),), "|u1", pad)},
                npz_member("x.npy", npy_bytes((300 << 18, 1, 2, 2), "|u1"), 300 << 20),
                ok[1],
            ]
        ),
        # the zip says 1,000 bytes (and their true CRC), the .npy header 400 MB (and the stream holds them)
        "zip size lies": zip_bytes(
            [npz_member("x.npy", lie, 400 << 20, size=1000, crc=zlib.crc32(lie + bytes(1000 - len(lie)))), ok[1]]
        ),
        # the .npy header declares 4 samples, the member holds 40
        "npy header lies (more data)": zip_bytes(
            [
                {
                    "name": "x.npy",
                    "data": npy_bytes((4, 1, 28, 28), "<f4", np.zeros((40, 1, 28, 28), np.float32).tobytes()),
                },
                ok[1],
            ]
        ),
        "npy header lies (less data)": zip_bytes([{"name": "x.npy", "data": gx[:-100]}, ok[1]]),
        # the deflate stream ends long before what both headers declare
        "stream shorter than declared": zip_bytes(
            [{"name": "x.npy", "data": zlib.compress(gx)[2:-4][:200], "method": 8, "size": len(gx)}, ok[1]]
        ),
        "shape of 10^18": zip_bytes([{"name": "x.npy", "data": npy_bytes((10**18, 1, 2, 2), "<f4")}, ok[1]]),
        "pickled object array": zip_bytes([{"name": "x.npy", "data": npy_bytes((2,), "|O", b"\x80\x04N.")}, ok[1]]),
        "header that is code": zip_bytes(
            [{"name": "x.npy", "data": npy_bytes((), text="__import__('os').getcwd()")}, ok[1]]
        ),
        "header of 60 KB": zip_bytes([{"name": "x.npy", "data": npy_bytes((), text="{" + " " * 60_000 + "}")}, ok[1]]),
        "100 members": zip_bytes(ok + [{"name": f"m{i}.npy", "data": gy} for i in range(98)]),
        "100,000 members": zip_bytes([{"name": f"{i}", "data": b""} for i in range(100_000)]),
        "nested name with ..": zip_bytes(ok + [{"name": "../../etc/x.npy", "data": gy}]),
        "two members named x.npy": zip_bytes(ok + [{"name": "x.npy", "data": gy}]),
        "encrypted member": zip_bytes([{**ok[0], "flags": 1}, ok[1]]),
        "lzma member": zip_bytes([{**ok[0], "method": 14}, ok[1]]),
        "bad crc": zip_bytes([{**ok[0], "crc": 1}, ok[1]]),
        "stored size lies": zip_bytes([{**ok[0], "size": 1 << 31}, ok[1]]),
        "truncated": zip_bytes(ok)[:3000],
        "not a zip": b"\x00" * 1000,
    }
    cases = {}
    for label, blob in files.items():
        p = tmp_path / f"{len(cases)}.npz"
        p.write_bytes(blob)
        cases[label] = _report(model, p)
    os.mkfifo(tmp_path / "fifo.npz")
    cases["FIFO named .npz"] = _report(model, tmp_path / "fifo.npz")
    (tmp_path / "ok.npz").write_bytes(zip_bytes(ok))
    cases["an honest file (runs)"] = _report(model, tmp_path / "ok.npz")
    ended = _cases(cases)
    why = {
        "member bomb by ratio": "COMPRESS_MAX_DECODE_RATIO",
        "zip size lies": "zip entry holds",
        "npy header lies (more data)": "zip entry holds",
        "npy header lies (less data)": "zip entry holds",
        "shape of 10^18": "more than compress loads",
        "pickled object array": "never objects",
        "header that is code": "malformed .npy header",
        "header of 60 KB": "at most 10,000",
        "100 members": "100 members",
        "100,000 members": "zip directory declares",
        "nested name with ..": "plain names",
        "two members named x.npy": "two members",
        "encrypted member": "encrypted",
        "lzma member": "method 14",
        "bad crc": "not a readable",
        "stored size lies": "stored zip entry",
        "truncated": "not a readable",
        "not a zip": "not a readable",
        "stream shorter than declared": "not a readable",
        "FIFO named .npz": "not found",
    }
    for label, e in ended.items():
        if label == "an honest file (runs)":
            assert e.code == 0 and e.seconds < CPU_S, e
        else:
            assert _refused(e, why[label]), (label, e)


# ----------------------------------------------------------------------------- folders: images, IDX, .npy
def _png_folder(root: Path, n: int = 2) -> Path:
    for c in range(2):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", (28, 28), 40 * i).save(root / str(c) / f"{i}.png")
    return root


def test_hostile_image_folders_are_refused_or_run_bounded(tmp_path, model, monkeypatch):
    outside = tmp_path / "outside"
    _png_folder(outside)
    roots: dict[str, Path] = {}

    def case(label, make):
        root = _png_folder(tmp_path / f"f{len(roots)}")
        make(root / "0")
        roots[label] = root

    case("FIFO named x.png", lambda d: os.mkfifo(d / "x.png"))

    def make_socket(d):
        monkeypatch.chdir(d)  # a relative name: a socket's path is limited to ~108 bytes
        s = socket.socket(socket.AF_UNIX)
        s.bind("x.png")
        s.close()

    case("socket named x.png", make_socket)
    try:
        os.mknod(tmp_path / "probe", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        case("character device named x.png", lambda d: os.mknod(d / "x.png", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    except (PermissionError, OSError):
        pass  # not root: no device can be made
    case("link loop x.png <-> y.png", lambda d: (os.symlink("y.png", d / "x.png"), os.symlink("x.png", d / "y.png")))
    case("link out of the folder", lambda d: os.symlink(outside / "0" / "0.png", d / "x.png"))
    case("link to /dev/zero", lambda d: os.symlink("/dev/zero", d / "x.png"))
    case("class folder linked outside", lambda d: os.symlink(outside / "1", d.parent / "2"))
    case("PNG of 100000 x 100000", lambda d: (d / "x.png").write_bytes(png_bytes(100_000, 100_000)))
    case("PNG of 10000 x 10000", lambda d: (d / "x.png").write_bytes(png_bytes(10_000, 10_000)))
    case("PNG of 5000 x 5000", lambda d: (d / "x.png").write_bytes(png_bytes(5_000, 5_000)))

    def truncated(d):
        Image.effect_noise((28, 28), 50).save(d / "x.png")
        (d / "x.png").write_bytes((d / "x.png").read_bytes()[:120])

    case("truncated PNG", truncated)
    case("EPS named x.png", lambda d: (d / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"))
    case("folders 40 deep", lambda d: os.makedirs(d / "/".join("d" * 40)))
    case("folder link loop (runs)", lambda d: os.symlink("..", d / "loop"))
    case("link inside the folder (runs)", lambda d: os.symlink("1.png", d / "x.png"))
    many = _png_folder(tmp_path / "many")
    for i in range(1200):
        (many / "1" / f"{i}.png").write_bytes(b"")  # counted, never opened
    cases = {k: _report(model, f"folder:{r}") for k, r in roots.items()}
    cases["1,204 images (limit 1,000)"] = _report(model, f"folder:{many}")
    ended = _cases(cases, "import compress.data.images as im\nim.MAX_FILES = 1000\n")
    why = {
        "FIFO named x.png": "is a FIFO",
        "socket named x.png": "is a socket",
        "character device named x.png": "is a character device",
        "link loop x.png <-> y.png": "loops",
        "link out of the folder": "leads out",
        "link to /dev/zero": "leads out",
        "class folder linked outside": "leads out",
        "PNG of 100000 x 100000": "cannot read image",
        "PNG of 10000 x 10000": "more than 16,777,216 pixels",
        "PNG of 5000 x 5000": "more than 16,777,216 pixels",
        "truncated PNG": "cannot read image",
        "EPS named x.png": "cannot read image",
        "folders 40 deep": "nested more than 16",
        "1,204 images (limit 1,000)": "more than 1,000 images",
    }
    for label, e in ended.items():
        if label.endswith("(runs)"):
            assert e.code == 0 and e.seconds < CPU_S, (label, e)
        else:
            assert _refused(e, why[label]), (label, e)


def test_hostile_idx_npy_and_large_folders_are_refused_in_one_line(tmp_path, model):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(idx_bytes([2, 28, 28], bytes(2 * 784)))
    labels = idx_bytes([2], b"\x00\x01")
    folders = {
        "IDX of 65536^3": idx_bytes([65536, 65536, 65536], bytes(16)),
        "IDX truncated": idx_bytes([100, 28, 28], bytes(10 * 784)),
        "IDX of 4 dims": idx_bytes([1, 1, 1, 1], b"\x00"),
        "IDX gzip bomb": "gz",
        "IDX a FIFO": "fifo",
        "IDX link out of the folder": "link",
    }
    cases = {}
    for label, content in folders.items():
        d = tmp_path / f"idx{len(cases)}"
        d.mkdir()
        (d / "t-labels-idx1-ubyte").write_bytes(labels)
        img = d / "t-images-idx3-ubyte"
        if content == "gz":  # a true header of 1 GB, in 1 MB of gzip
            head = idx_bytes([(1 << 30) // 784, 28, 28])
            n = (1 << 30) // 784 * 784
            img = d / "t-images-idx3-ubyte.gz"
            img.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflated(head, n) + struct.pack("<LL", 0, 0))
        elif content == "fifo":
            os.mkfifo(img)
        elif content == "link":
            os.symlink(outside, img)
        else:
            img.write_bytes(content)
        cases[label] = _report(model, d)
    x = np.zeros((4, 1, 28, 28), np.float32)
    npys = {
        "x.npy header lies": npy_bytes((400, 1, 28, 28), "<f4", x.tobytes()),
        "x.npy pickled objects": npy_bytes((4,), "|O", b"\x80\x04N."),
        "x.npy of 10^12 floats": npy_bytes((10**12,), "<f4", x.tobytes()),
        "x.npy link out of the folder": "link",
    }
    for label, content in npys.items():
        d = tmp_path / f"npy{len(cases)}"
        d.mkdir()
        (d / "y.npy").write_bytes(npy_bytes((4,), "<i8", np.arange(4).tobytes()))
        if content == "link":
            (tmp_path / "secret.npy").write_bytes(npy_bytes(x.shape, "<f4", x.tobytes()))
            os.symlink(tmp_path / "secret.npy", d / "x.npy")
        else:
            (d / "x.npy").write_bytes(content)
        cases[label] = _report(model, d)
    # a folder of 6,204 entries, with the bound on entries looked at set to 5,000 (images: 2 M)
    many = _png_folder(tmp_path / "many")
    for i in range(6200):
        (many / "1" / f"{i}.txt").write_bytes(b"")
    cases["folder of 6,204 entries (limit 5,000)"] = _report(model, f"folder:{many}")
    ended = _cases(cases, "import compress.data.images as im\nim.MAX_ENTRIES = 5000\n")
    why = {
        "folder of 6,204 entries (limit 5,000)": "more than 5,000 files",
        "IDX of 65536^3": "more than",
        "IDX truncated": "does not match",
        "IDX of 4 dims": "4 dimensions",
        "IDX gzip bomb": "COMPRESS_MAX_DECODE_RATIO",
        "IDX a FIFO": "is a FIFO",
        "IDX link out of the folder": "leads out",
        "x.npy header lies": "file holds",
        "x.npy pickled objects": "never objects",
        "x.npy of 10^12 floats": "more than compress loads",
        "x.npy link out of the folder": "leads out",
    }
    for label, e in ended.items():
        assert _refused(e, why[label]), (label, e)


# ----------------------------------------------------------------------------- the .npy and .npz readers, fuzzed
_LITERALS = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-2, 1 << 70),
        st.floats(),
        st.text(max_size=6),
        st.sampled_from(["<f4", "|u1", "<i8", "|O", "<U3", "V8", "f16", ">f8", "b1"]),
    ),
    lambda inner: st.one_of(
        st.tuples(inner, inner), st.tuples(inner, inner, inner), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_FIELDS = st.fixed_dictionaries({"descr": _LITERALS, "fortran_order": _LITERALS, "shape": _LITERALS})


@settings(max_examples=300, deadline=None)
@given(
    header=st.one_of(_FIELDS.map(repr), st.text(max_size=200), _LITERALS.map(repr)),
    raw=st.binary(max_size=64),
    cut=st.integers(0, 400),
)
def test_npy_headers_are_parsed_or_refused_never_crash(header, raw, cut):
    """Field values of every type, text of any kind, raw bytes, cut anywhere: a header or an InputError."""
    import io

    for blob in (
        npy_bytes((), text=header.encode("utf-8", "replace")),
        b"\x93NUMPY" + raw,
        npy_bytes((), text=header.encode("utf-8", "replace"))[:cut],
    ):
        try:
            h = npy_mod.read_npy_header(io.BytesIO(blob), "fuzz")
        except CompressError:
            continue
        assert h.nbytes <= files_mod.MAX_ARRAY_BYTES and h.dtype.kind in "biuf"


_HONEST = zip_bytes(
    [
        {"name": "x.npy", "data": npy_bytes((2, 1, 2, 2), "<f4", bytes(32))},
        {
            "name": "y.npy",
            "data": zlib.compress(npy_bytes((2,), "<i8", bytes(16)))[2:-4],
            "method": 8,
            "size": len(npy_bytes((2,), "<i8", bytes(16))),
            "crc": zlib.crc32(npy_bytes((2,), "<i8", bytes(16))),
        },
    ]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_npz_files_are_read_or_refused_never_crash(data):
    def word(b, i):  # a size or offset field set to something large
        b[i : i + 4] = struct.pack("<L", data.draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 1 << 30])))

    blob = mutated(_HONEST, data, word)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.npz"
        p.write_bytes(blob)
        try:
            arrays = npy_mod.read_npz(p, mmap_min=1 << 20)
        except CompressError:
            return
        assert sum(a.nbytes for a in arrays.values()) <= files_mod.MIN_DECODED_BYTES


@pytest.mark.parametrize("where", ["before the locator", "where the locator says"])
def test_a_zip64_directory_is_sized_before_zipfile_reads_it(tmp_path, where):
    """A zip64 end record (what zipfile reads the directory's size from when it finds one) of 2^40 bytes."""
    honest = zip_bytes([{"name": "x.npy", "data": npy_bytes((0,), "<f4")}])
    end = honest.index(b"PK\x05\x06")
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, 1 << 40, 0)
    if where == "before the locator":
        blob = honest[:end] + record + struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1) + honest[end:]
    else:  # the record at the start of the file, the locator pointing to it
        blob = record + honest[:end] + struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1) + honest[end:]
    (tmp_path / "z.npz").write_bytes(blob)
    with pytest.raises(CompressError, match="zip directory declares 1,099,511,627,776 bytes"):
        npy_mod.read_npz(tmp_path / "z.npz", mmap_min=1 << 20)


def test_measured_numbers_are_printed():
    """``pytest -s`` shows every hostile case's time and peak memory (the numbers the report quotes)."""
    for k, e in MEASURED.items():
        print(f"{k:45s} {e.seconds:6.2f} s {e.peak_mb:6.0f} MB")


# ----------------------------------------------------------------------------- the second round of attacks
def _deflated_at(raw: bytes, ratio: int) -> bytes:
    """``raw`` deflated, padded with empty stored blocks until it is exactly 1/``ratio`` of its size: a member
    inside any decode ratio above ``ratio``, whatever its contents."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH)
    return body + b"\x00\x00\x00\xff\xff" * max(0, (len(raw) // ratio - len(body)) // 5) + c.flush()


def _progressive_jpeg(path, scans: int, side: int = 64) -> None:
    """A grey progressive JPEG whose first AC scan is repeated ``scans`` times: each scan is decoded over the
    whole image, so a 1 MB file of them took minutes to read."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=50)
    b = buf.getvalue()
    starts = [i for i in range(len(b) - 1) if b[i] == 0xFF and b[i + 1] == 0xDA]
    ends = starts[1:] + [b.rindex(b"\xff\xd9")]
    ac = next(b[s:e] for s, e in zip(starts, ends, strict=False) if b[s + 5 + 2 * b[s + 4]] > 0)  # Ss > 0: an AC scan
    path.write_bytes(b[: b.rindex(b"\xff\xd9")] + ac * scans + b"\xff\xd9")


def test_second_round_data_attacks_are_refused_in_one_line(tmp_path, model):
    """A uint8 .npz at 50x deflate (inside the 100x ratio, but 200x once held as float32: 5 GB from 4.5 MB
    before), a JPEG of 200 scans, a 4,194,304 x 4 image (16 KB; 4.2 GB once ?resize=28 scales its shorter side),
    Unicode digits in
    an option, and ?size / ?channels that make samples or a data set too large: one line each."""
    n = 40_000  # 31 MB of uint8 from 0.6 MB: 125 MB as float32, past both the floor (64 MiB) and 100x the file
    raw = npy_bytes((n, 1, 28, 28), "|u1", bytes(n * 784))
    y = npy_bytes((n,), "|u1", bytes(n))
    (tmp_path / "f32.npz").write_bytes(
        zip_bytes(
            [
                {"name": "x.npy", "data": _deflated_at(raw, 50), "method": 8, "size": len(raw), "crc": zlib.crc32(raw)},
                {"name": "y.npy", "data": y},
            ]
        )
    )
    for d in ("scans/a", "wide/a"):
        (tmp_path / d).mkdir(parents=True)
    _progressive_jpeg(tmp_path / "scans/a/x.jpg", 200)
    (tmp_path / "wide/a/x.png").write_bytes(png_bytes(1 << 22, 4))
    cases = {
        "50x deflate, 200x as float32": (tmp_path / "f32.npz", "more than 100x"),
        "a JPEG of 200 scans": (f"folder:{tmp_path / 'scans'}?size=28&channels=1", "scans"),
        "a 4,194,304 x 4 image resized by its shorter side": (
            f"folder:{tmp_path / 'wide'}?resize=28&crop=28&channels=1",
            "would make it",
        ),
        "a superscript digit": ("mnist5k?limit=\u00b2", "must be an integer"),
        "an Arabic-Indic digit": ("mnist5k?limit=\u0663", "must be an integer"),
        "samples of 64 x 4096 x 4096": ("digits?limit=1&size=4096&channels=64", "values per sample|at most"),
        "a data set of 300 GB": ("digits?size=4096", "GiB in memory"),
    }
    ended, child = run_cli_each([_report(model, data) for data, _ in cases.values()])
    for (what, (_, match)), e in zip(cases.items(), ended, strict=False):
        assert e.one_line_refusal and re.search(match, e.err) and e.seconds < 20, (what, e)
    assert child.peak_mb < 800, child
