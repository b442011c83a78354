"""The data users have: their own Dataset class, a DataLoader, a folder of images and a memory-mapped .npz,
through every command; their loss and metric; distillation; bad data of every kind as one-line errors."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from compress import data as data_mod
from compress.data import sources
from compress.errors import InputError
from compress.model_io import save_model

N = 240  # samples of the embedded MNIST digits every source below holds


def write_png_folder(data, root, size_of=None):
    """``root/<label>/<i>.png`` from a TensorData of grey images in [0, 1] (a test helper, not shipped)."""
    for i in range(len(data)):
        x = data.x[i, 0]
        img = Image.fromarray((x * 255).round().to(torch.uint8).numpy(), mode="L")
        if size_of is not None:
            img = img.resize(size_of(i))
        d = root / str(int(data.y[i]))
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:05d}.png")
    return root


USER_CODE = '''
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


class Digits(Dataset):
    """A user's own Dataset: reads samples from an .npz lazily, returns (tensor, int) pairs."""

    def __init__(self, path={npz!r}):
        self.path = path
        self.n = len(np.load(path)["y"])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        z = np.load(self.path)
        return torch.from_numpy(z["x"][i].astype(np.float32) / 255.0), int(z["y"][i])


def dataset():
    return Digits()


def loader():
    return DataLoader(Digits(), batch_size=32, shuffle=True)


class NotPairs(Digits):
    def __getitem__(self, i):
        return super().__getitem__(i)[0]


def not_pairs():
    return NotPairs()


class Breaks(Digits):
    def __getitem__(self, i):
        if i == 7:
            raise RuntimeError("disk went away at sample 7")
        return super().__getitem__(i)


def breaks():
    return Breaks()


class Stream(IterableDataset):
    """An iterable Dataset: samples front to back, no indices."""

    def __init__(self):
        self.d = Digits()

    def __len__(self):
        return len(self.d)

    def __iter__(self):
        return (self.d[i] for i in range(len(self.d)))


def stream():
    return Stream()


def smooth(outputs, targets):
    import torch.nn.functional as F
    with open({calls!r}, "a") as f:  # what the test checks: this loss is the one fine-tuning calls
        f.write("x")
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)
'''


@pytest.fixture(scope="module")
def digits240():
    return data_mod.load(f"mnist5k?limit={N}&seed=3")


@pytest.fixture(scope="module")
def sources_dir(tmp_path_factory, digits240):
    root = tmp_path_factory.mktemp("userdata")
    x8 = (digits240.x * 255).round().to(torch.uint8).numpy()
    np.savez(root / "digits.npz", x=x8, y=digits240.y.numpy())  # stored uncompressed: memory-mappable
    (root / "userdata.py").write_text(USER_CODE.format(npz=str(root / "digits.npz"), calls=str(root / "calls.txt")))
    write_png_folder(digits240, root / "png")
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, lenet5_trained):
    p = tmp_path_factory.mktemp("model") / "lenet5.pt"
    save_model(lenet5_trained, p)
    return p


@pytest.fixture
def mmap_everything(monkeypatch):
    monkeypatch.setattr(sources, "MMAP_MIN_BYTES", 0)


KINDS = ["dataset", "loader", "folder", "npz"]


def spec_of(kind, root):
    return {
        "dataset": f"{root}/userdata.py:dataset",
        "loader": f"{root}/userdata.py:loader",
        "folder": f"folder:{root}/png",
        "npz": f"{root}/digits.npz",
    }[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_reads_the_same_samples(kind, sources_dir, digits240, mmap_everything):
    """The same 240 digits through a user's Dataset, a DataLoader, a PNG folder and a memory-mapped .npz:
    the same pixels and labels, read by indices and batches (nothing loaded whole)."""
    d = data_mod.load(spec_of(kind, sources_dir))
    assert len(d) == N and d.sample_shape == (1, 28, 28)
    if kind == "npz":
        assert isinstance(d, data_mod.ArrayData) and isinstance(d.x, np.memmap)
    if kind == "folder":  # sorted by class, then file: the file names are the original indices
        order = torch.tensor([int(f[-9:-4]) for f in d.files])
    else:
        order = torch.arange(N)
    x, y = next(iter(data_mod.batches(d, N)))
    assert torch.equal(y, digits240.y[order])
    assert torch.allclose(x, digits240.x[order], atol=1e-6)
    tr, va = data_mod.split(d, 0.2)
    assert len(tr) + len(va) == N and len(va) == pytest.approx(0.2 * N, abs=10)


def _recipe(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(
        textwrap.dedent("""
        version = 2
        [[stage]]
        method = "threshold"
        sparsity = [0.5, 0.7]
        rounds = 1
        finetune = { epochs = 0.3 }
        [[stage]]
        method = "quantize"
        scheme = "kmeans"
        bits = 6
        finetune = { epochs = 0.2 }
    """)
    )
    return p


# a Dataset's and a DataLoader's every command runs in make bench (15 s each); tests/data/test_kinds.py gives both
# to every library function that takes data, in make test
@pytest.mark.parametrize(
    "kind", [pytest.param(k, marks=pytest.mark.slow) if k in ("dataset", "loader") else k for k in KINDS]
)
def test_every_command_on_each_kind(kind, sources_dir, model_file, tmp_path, cli, mmap_everything):
    """report, prune (threshold, l1-filter, channel-union), quantize --train-data, factorize, export --int8
    --calib-data and pipeline, each on data of this kind; every accuracy names it."""
    spec = spec_of(kind, sources_dir)
    m = model_file
    common = ["--no-latency", "--train-data", spec]
    runs = {
        "report": ["report", m, "--data", spec, "--no-latency"],
        "threshold": [
            "prune",
            m,
            "--sparsity",
            "0.6",
            "--rounds",
            "1",
            "--epochs",
            "0.3",
            *common,
            "-o",
            tmp_path / "t.pt",
        ],
        "l1": ["prune", m, "-m", "l1-filter", "--ratio", "0.25", "--epochs", "0.3", *common, "-o", tmp_path / "l.pt"],
        "cu": ["prune", m, "-m", "channel-union", "--epochs", "0.5", *common, "-o", tmp_path / "c.pt"],
        "quantize": [
            "quantize",
            m,
            "--bits",
            "4",
            "--scheme",
            "kmeans",
            "--epochs",
            "0.3",
            *common,
            "-o",
            tmp_path / "q.pt",
        ],
        "factorize": ["factorize", m, "--energy", "0.9", *common, "-o", tmp_path / "f.pt"],
        "export": ["export", m, "--int8", "--calib-data", spec, "--data", spec, "-o", tmp_path / "m.onnx"],
        "pipeline": [
            "pipeline",
            m,
            "--train-data",
            spec,
            "--recipe",
            _recipe(tmp_path),
            "--max-accuracy-drop",
            "5",
            "--no-latency",
            "-o",
            tmp_path / "p.cpz",
            "--json",
            tmp_path / "p.json",
        ],
    }
    for what, args in runs.items():
        r = cli(*args)
        assert r.code == 0, (what, r.err)
        if what == "report":
            assert spec in r.out and "accuracy %" in r.out
        elif what in ("export",):
            assert (tmp_path / "m.onnx").stat().st_size > 0
        elif what != "pipeline":
            assert f"held out of --train-data, {N // 5} samples" in r.out.replace("\n", " ") or "48 samples" in r.out
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["validation"]["data"] == f"{spec}[val]" and summary["cpz_bytes"] > 0


def test_folder_options_and_augmentation(tmp_path, digits240):
    root = write_png_folder(digits240.subset(range(20)), tmp_path / "png")
    d = data_mod.load(f"folder:{root}?size=32&channels=3&norm=imagenet")
    x, _ = d.batch([0, 1])
    assert x.shape == (2, 3, 32, 32)
    assert float(x.min()) < -1.5  # normalised: black is (0 - 0.485) / 0.229
    d = data_mod.load(f"folder:{root}?resize=36&crop=32&rrc=0.5&flip")
    ev, _ = d.batch([0, 1])
    torch.manual_seed(0)
    tr, _ = d.batch([0, 1], train=True)
    assert ev.shape == tr.shape == (2, 1, 32, 32) and not torch.equal(ev, tr)  # augmentation only in training
    assert torch.equal(ev, d.batch([0, 1])[0])  # evaluation is deterministic
    # a folder given as a plain DIR is recognised by its class subfolders of images
    assert isinstance(data_mod.load(str(root)), data_mod.FolderData)


def test_workers_read_the_same_batches(sources_dir):
    """Loader processes change nothing but speed: the same batches in the same order as in-process."""
    d0 = data_mod.load(f"folder:{sources_dir}/png")
    d2 = data_mod.load(f"folder:{sources_dir}/png?workers=2")
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    for (x0, y0), (x2, y2) in zip(data_mod.batches(d0, 50, order), data_mod.batches(d2, 50, order), strict=False):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


BAD = {
    "empty folder": (lambda root: root.mkdir(), "no class subfolders"),
    "class without images": (
        lambda root: (
            (root / "0").mkdir(parents=True),
            (root / "1").mkdir(),
            Image.new("L", (8, 8)).save(root / "0" / "a.png"),
        ),
        "holds no images",
    ),
    "corrupt image": (
        lambda root: (
            (root / "0").mkdir(parents=True),
            Image.new("L", (28, 28)).save(root / "0" / "a.png"),
            (root / "0" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"),
        ),
        "cannot read image",
    ),
    "truncated image": (
        lambda root: (
            (root / "0").mkdir(parents=True),
            Image.new("L", (28, 28)).save(root / "0" / "a.png"),
            Image.effect_noise((28, 28), 50).save(root / "0" / "b.png"),
            (root / "0" / "b.png").write_bytes((root / "0" / "b.png").read_bytes()[:120]),
        ),
        "cannot read image",
    ),
    "mixed sizes": (
        lambda root: [
            (
                (root / str(c)).mkdir(parents=True, exist_ok=True),
                Image.new("L", (28 + 2 * (i % 2), 28)).save(root / str(c) / f"{i}.png"),
            )
            for c in range(2)
            for i in range(10)
        ],
        "give one size",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_one_line_errors(case, tmp_path, cli, model_file):
    make, message = BAD[case]
    root = tmp_path / "imgs"
    make(root)
    out = tmp_path / "out.pt"
    r = cli("prune", model_file, "--sparsity", "0.5", "--epochs", "0.5", "--train-data", f"folder:{root}", "-o", out)
    assert r.code != 0 and message in r.err and "Traceback" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    "fn,message",
    [("not_pairs", "not (input, target)"), ("breaks", "reading sample 7 failed: RuntimeError: disk went away")],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_datasets_are_one_line_errors(fn, message, workers, sources_dir, cli, model_file, tmp_path):
    out = tmp_path / "out.pt"
    r = cli(
        "prune",
        model_file,
        "--sparsity",
        "0.5",
        "--epochs",
        "1",
        "--no-latency",
        "--workers",
        workers,
        "--train-data",
        f"{sources_dir}/userdata.py:{fn}",
        "-o",
        out,
    )
    assert r.code != 0 and message in r.err and "Traceback" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and not out.exists()


def test_users_loss_and_top5_drive_the_pipeline(sources_dir, model_file, tmp_path, cli):
    """--loss and --metric top5 end to end: the loss is the one fine-tuning calls, the budget is in top-5 points."""
    spec = f"{sources_dir}/userdata.py:dataset"
    r = cli(
        "pipeline",
        model_file,
        "--train-data",
        spec,
        "--recipe",
        _recipe(tmp_path),
        "--loss",
        f"{sources_dir}/userdata.py:smooth",
        "--metric",
        "top5",
        "--max-accuracy-drop",
        "1",
        "--no-latency",
        "-o",
        tmp_path / "p.cpz",
        "--json",
        tmp_path / "p.json",
    )
    assert r.code == 0, r.err
    s = json.loads((tmp_path / "p.json").read_text())
    assert s["metric"] == "top5" and s["base_accuracy"] >= 90.0  # top-5 of a trained LeNet-5
    assert len((sources_dir / "calls.txt").read_text()) > 0  # fine-tuning went through the user's loss
    for st in s["stages"]:
        for c in st["tried"]:  # judged in top-5 points with a standard error of the paired differences
            assert c["within_budget"] == (c["drop"] + c["se"] <= 1 + 1e-9)


def test_targets_need_not_be_labels(lenet5_trained, digits240):
    """Soft targets (a regression onto the teacher's probabilities), the user's loss and a per-batch metric."""
    import copy

    import torch.nn.functional as F

    from compress import prune_
    from compress.config import FineTune
    from compress.method import Context
    from compress.prune import ThresholdConfig

    teacher = copy.deepcopy(lenet5_trained).eval()
    with torch.no_grad():
        soft = F.softmax(teacher(digits240.x), 1)
    data = data_mod.as_data((digits240.x, soft), "soft targets")
    assert data.labels() is None

    def mse(out, target):
        return F.mse_loss(F.softmax(out, 1), target)

    def neg_mse(out, target):  # higher is better; one number per batch
        return -100.0 * float(F.mse_loss(F.softmax(out, 1), target))

    ctx = Context(train=data, val=data, loss=mse, metric=neg_mse)
    m = prune_(
        copy.deepcopy(lenet5_trained), ThresholdConfig(sparsity=0.5, rounds=1, finetune=FineTune(epochs=0.5)), ctx=ctx
    )
    assert ctx.score(m, data) > -1.0  # still close to the teacher's probabilities
    with pytest.raises(InputError, match="not integer class labels"):
        _ = data.num_classes


def test_distillation_learns_from_the_input_model(lenet5_trained, digits240):
    """--distill: the loss mixes Hinton's soft-target term, computed against the input model (eval mode)."""
    import copy

    from compress.config import FineTune
    from compress.train import distill_loss, fit

    s = torch.randn(8, 10)
    assert float(distill_loss(s, s, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(s, torch.randn(8, 10), 4.0)) > 0
    teacher = copy.deepcopy(lenet5_trained)
    calls = []
    teacher.register_forward_hook(lambda mod, i, o: calls.append(mod.training))
    student = copy.deepcopy(lenet5_trained)
    with torch.no_grad():  # a damaged student: distillation alone (weight 1) pulls it back to the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        before = float(distill_loss(student(digits240.x), teacher(digits240.x), 4.0))
    calls.clear()
    fit(student, digits240, FineTune(epochs=2, lr=1e-3, distill=4.0, distill_weight=1.0), teacher=teacher)
    with torch.no_grad():
        after = float(distill_loss(student.eval()(digits240.x), teacher(digits240.x), 4.0))
    assert calls and not any(calls[:-1])  # the teacher ran in eval mode
    assert after < 0.5 * before


def test_iterable_data_with_its_own_validation(sources_dir, model_file, tmp_path, cli):
    """An iterable Dataset trains front to back; it cannot be split, so --val-data judges (a folder here)."""
    out = tmp_path / "p.pt"
    base = [
        "prune",
        model_file,
        "--sparsity",
        "0.6",
        "--rounds",
        "1",
        "--epochs",
        "1",
        "--no-latency",
        "--train-data",
        f"{sources_dir}/userdata.py:stream",
    ]
    r = cli(*base, "-o", out)
    assert r.code != 0 and "cannot be split" in r.err and "--val-data" in r.err and not out.exists()
    r = cli(*base, "--val-data", f"folder:{sources_dir}/png", "-o", out)
    assert r.code == 0, r.err
    assert f"on --val-data folder:{sources_dir}/png, {N} samples" in " ".join(r.out.split())
    assert out.exists()


def test_data_with_options_can_go_to_spawned_loader_processes(sources_dir, mmap_everything):
    """Loader processes started by spawning (macOS, Windows) receive the data by pickling: options are data,
    not closures; a memory-mapped array travels as its file (mapped again, not copied); the batches they read
    are the same."""
    import multiprocessing
    import pickle

    d = data_mod.load(f"{sources_dir}/digits.npz?size=32&channels=3&limit=40")
    blob = pickle.dumps(d)
    assert len(blob) < 20_000  # not the array (240 x 784 bytes)
    back = pickle.loads(blob)
    assert isinstance(back.base.base.x, np.memmap)
    assert torch.equal(back.batch([0, 1, 2])[0], d.batch([0, 1, 2])[0]) and back.sample_shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader(
        data_mod.core._Chunks(d, False),
        batch_size=None,
        sampler=[torch.arange(0, 20), torch.arange(20, 40)],
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context("spawn"),
    )
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, d.batch(range(40))[0])
