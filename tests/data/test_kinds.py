"""One data path: every public function that takes data takes each kind ``compress.data.as_data`` takes --
``(x, y)`` tensors, a torch ``Dataset``, a ``DataLoader``, a ``compress.data.Data`` -- and gives the same
numbers for the same samples; targets keep their kind (int64 labels, float targets); anything else is an
InputError naming the argument."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import compress
from compress import ChannelUnionPruner, FineTune, InputError, ThresholdPruner, UsageError
from compress import data as data_mod
from compress.data.kinds import KINDS as ACCEPTED
from compress.method import Context
from compress.prune import ChannelUnionConfig

N, CLASSES = 64, 3


def samples(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 1 x 8 x 8 inputs with int64 labels of 3 classes (a third each) that a tiny model can partly learn."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    top = x[:, 0, :4].mean((1, 2))  # the brighter the top half, the higher the class
    return x, torch.bucketize(top, top.quantile(torch.tensor([1 / 3, 2 / 3])))


X, Y = samples()


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES)
    )


class Samples(Dataset):
    """A user's own map-style Dataset: NumPy inputs and NumPy int64 labels."""

    def __init__(self, x, y):
        self.x, self.y = x.numpy(), y.numpy()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    """A user's own iterable Dataset of (input, target) samples."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=False))


KINDS = {
    "pair": lambda x, y: (x, y),
    "dataset": lambda x, y: Samples(x, y),
    "dataloader": lambda x, y: DataLoader(TensorDataset(x, y), batch_size=16),  # the user's report
    "data": lambda x, y: data_mod.as_data((x, y), "mine"),
}


def each_kind(fn, x=X, y=Y) -> dict:
    """``fn(data)`` for the same samples as each kind of data."""
    return {kind: fn(make(x, y)) for kind, make in KINDS.items()}


def same(results: dict) -> None:
    """Every kind's result equals the pair's (tensors and state dicts exactly, numbers exactly)."""
    ref = results["pair"]
    for kind, r in results.items():
        if isinstance(ref, dict) and ref and isinstance(next(iter(ref.values())), torch.Tensor):
            assert r.keys() == ref.keys(), kind
            for k in ref:
                assert torch.equal(r[k], ref[k]), (kind, k)
        elif isinstance(ref, torch.Tensor):
            assert torch.equal(r, ref), kind
        else:
            assert r == ref, kind


# ----------------------------------------------------------------------------- targets keep their kind
@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: DataLoader(TensorDataset(x, y), batch_size=16),  # the report: int64 labels came back float32
        lambda x, y: DataLoader(Samples(x, y), batch_size=16),
        lambda x, y: DataLoader(Stream(x, y), batch_size=16),  # read as it batches
        lambda x, y: DataLoader(Stream(x, y), batch_size=None),  # read sample by sample, batched by compress
        lambda x, y: Samples(x, y),
        lambda x, y: TensorDataset(x, y),
        lambda x, y: Stream(x, y),
        lambda x, y: (x, y),
    ],
    ids=[
        "loader-tensors",
        "loader-dataset",
        "loader-iterable",
        "loader-unbatched",
        "dataset",
        "tensordataset",
        "iterable",
        "pair",
    ],
)
def test_targets_keep_their_dtype(make):
    d = data_mod.as_data(make(X, Y))
    ys = [y for _, y in data_mod.batches(d, 16)]
    assert all(y.dtype == torch.int64 for y in ys)
    assert torch.equal(torch.cat(ys), Y)
    soft = F.softmax(torch.randn(N, CLASSES, generator=torch.Generator().manual_seed(1)), 1)  # float targets
    d = data_mod.as_data(make(X, soft))
    ys = [y for _, y in data_mod.batches(d, 16)]
    assert all(y.dtype == torch.float32 for y in ys)
    assert torch.equal(torch.cat(ys), soft)


def test_a_dataloaders_labels_are_known_up_front():
    """A TensorDataset's labels are known without reading its samples, also inside a DataLoader (for a
    stratified split and the label range check)."""
    for obj in (TensorDataset(X, Y), DataLoader(TensorDataset(X, Y), batch_size=16)):
        assert torch.equal(data_mod.as_data(obj).labels(), Y)


def test_narrow_integer_labels_are_int64():
    """int32 / uint8 labels (a user's NumPy arrays) are what cross-entropy takes: int64."""
    for dtype in (torch.int32, torch.uint8):
        d = data_mod.as_data(DataLoader(Samples(X, Y.to(dtype)), batch_size=16))
        assert next(data_mod.batches(d, 16))[1].dtype == torch.int64


def test_users_cross_entropy_trains_on_a_dataloader():
    """The report: ``loss=F.cross_entropy`` on a DataLoader of int64 labels failed ("expected ... Long")."""
    for loader in (DataLoader(TensorDataset(X, Y), batch_size=16), DataLoader(Samples(X, Y), batch_size=16)):
        hist = compress.fit(tiny(), loader, FineTune(epochs=1, batch_size=16), loss=F.cross_entropy)
        assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    soft = F.softmax(torch.randn(N, CLASSES, generator=torch.Generator().manual_seed(1)), 1)
    hist = compress.fit(
        tiny(),
        DataLoader(Samples(X, soft), batch_size=16),
        FineTune(epochs=1, batch_size=16),
        loss=lambda out, t: F.mse_loss(F.softmax(out, 1), t),
    )
    assert np.isfinite(hist[0]["loss"])


# ----------------------------------------------------------------------------- every entry point, every kind
def test_evaluate_gives_one_accuracy_for_every_kind():
    m = tiny()
    compress.fit(m, (X, Y), FineTune(epochs=2, batch_size=16, lr=1e-2))
    acc = each_kind(lambda d: compress.evaluate(m, d))
    same(acc)
    assert acc["pair"] == pytest.approx(100.0 * float((m(X).argmax(1) == Y).float().mean()))
    same(each_kind(lambda d: compress.evaluate(m, d, metric="top5")))
    same(each_kind(lambda d: compress.summarize(m, (1, 1, 8, 8), d, latency=False, layers=False)["accuracy"]))


def test_fit_trains_the_same_on_every_kind():
    def trained(d):
        m = tiny()
        hist = compress.fit(m, d, FineTune(epochs=1, batch_size=16))
        return hist[0]["loss"], m.state_dict()

    out = each_kind(trained)
    same({k: v[0] for k, v in out.items()})
    same({k: v[1] for k, v in out.items()})


def test_verbs_take_every_kind():
    ft = FineTune(epochs=1, batch_size=16)

    def pruned(d):
        cfg = compress.ThresholdConfig(sparsity=0.5, rounds=1, finetune=ft)  # layers' sparsities from the data
        return compress.prune_(tiny(), cfg, d, d).state_dict()

    def factorized(d):
        return compress.factorize_(tiny(), compress.FactorizeConfig(rank=2, finetune=ft), d).state_dict()

    def kmeans(d):
        return compress.quantize_(tiny(), compress.QuantConfig(bits=3, scheme="kmeans", finetune=ft), d).state_dict()

    def int8(d, **kw):
        q = compress.lower_int8(tiny().eval(), compress.Int8Config(observer="minmax", calib_samples=N), **kw)
        return q(X)

    def stage(d):
        res = compress.run(
            "prune",
            tiny(),
            compress.ThresholdConfig(sparsity=0.5, rounds=2, allocate="std", finetune=ft),
            Context(train=d, val=d),
        )
        return [r["accuracy"] for r in res.records]

    same(each_kind(pruned))
    same(each_kind(factorized))
    same(each_kind(kmeans))
    same(each_kind(lambda d: int8(d, train_data=d)))
    same(each_kind(lambda d: int8(d, calib_data=d)))  # Int8Config's calibration data, by its own keyword
    same(each_kind(stage))


def test_context_converts_every_kind_however_it_is_set():
    m = tiny()
    scores = {}
    for kind, make in KINDS.items():
        ctx = Context(train=make(X, Y))
        ctx.val = make(X, Y)  # set later: converted all the same
        assert isinstance(ctx.train, data_mod.Data) and isinstance(ctx.val, data_mod.Data)
        assert ctx.shape(m) == (1, 1, 8, 8)
        scores[kind] = ctx.score(m, ctx.val), ctx.score(m, make(X, Y))
    same(scores)
    seen = []  # the user's evaluate gets a Data whichever kind ctx.score was given

    def users_evaluate(model, data):
        seen.append(data)
        return compress.evaluate(model, data)

    ctx = Context(evaluate=users_evaluate)
    same(each_kind(lambda d: ctx.score(m, d)))
    assert all(isinstance(d, data_mod.Data) for d in seen) and len(seen) == len(KINDS)


def test_split_and_check_fits_take_every_kind():
    def held_out(d):
        _, va = data_mod.split(d, 0.25)
        return next(data_mod.batches(va, N))[0]

    labelled = {k: v for k, v in KINDS.items() if k != "dataset"}  # a stratified split: labels known up front
    same({kind: held_out(make(X, Y)) for kind, make in labelled.items()})
    assert len(held_out(Samples(X, Y))) == N // 4  # a seeded random split
    for make in KINDS.values():
        data_mod.check_fits(tiny(), make(X, Y))
        with pytest.raises(InputError, match=r"samples of shape \(1, 4, 4\)\) does not fit the model"):
            data_mod.check_fits(tiny(), make(X[:, :, :4, :4], Y))
    for make in labelled.values():
        with pytest.raises(InputError, match="has label 2 but the model has 2 classes"):
            data_mod.check_fits(tiny(), make(X, Y), num_classes=2)


def test_pipeline_takes_every_kind():
    recipe = {
        "stage": [
            {"method": "threshold", "sparsity": [0.3, 0.6], "rounds": 1, "allocate": "std", "finetune": {"epochs": 0}}
        ],
        "max_accuracy_drop": 100,
    }
    keys = ("base_accuracy", "final_accuracy", "cpz_bytes", "validation")

    def summary(d, held_out=False):
        _, s = compress.pipeline(tiny(), d, recipe, val_data=None if held_out else d, test_data=d, latency=False)
        return {k: getattr(s, k) for k in keys if k != "validation"} | {"samples": s.validation["samples"]}

    same(each_kind(summary))
    # held out of the training data: the same stratified split wherever the labels are known up front (a
    # TensorDataset's, also inside a DataLoader; a Dataset of its own says nothing until read: a random split)
    labelled = {k: v for k, v in KINDS.items() if k != "dataset"} | {"tensordataset": TensorDataset}
    same({kind: summary(make(X, Y), held_out=True) for kind, make in labelled.items()})


def test_hooks_take_every_kind():
    """The methods a user's loop drives read their data through ``Context`` too (BatchNorm re-estimation and
    each reconfiguration's accuracy, here)."""

    def run_loop(d):
        m = tiny()
        pruner = ChannelUnionPruner(m, ChannelUnionConfig(lasso_ratio=0.5), Context(train=d, val=d), interval=2)
        pruner.attach()
        opt = torch.optim.SGD(pruner.model.parameters(), lr=0.1)
        for i in range(4):
            x, y = X[16 * i : 16 * (i + 1)], Y[16 * i : 16 * (i + 1)]
            loss = F.cross_entropy(pruner.model(x), y)
            opt.zero_grad()
            loss.backward()
            pruner.after_backward()
            opt.step()
            if pruner.step(0.1):
                opt = torch.optim.SGD(pruner.model.parameters(), lr=0.1)
        return [r.get("accuracy") for r in pruner.records], pruner.finalize().state_dict()

    out = each_kind(run_loop)
    assert all(a is not None for a in out["pair"][0])
    same({k: v[0] for k, v in out.items()})
    same({k: v[1] for k, v in out.items()})


def test_onnx_report_takes_every_kind(tmp_path):
    from compress.export import export, onnx_summary

    m = tiny().eval()
    path = tmp_path / "tiny.onnx"
    res = each_kind(lambda d: export(m, path, (1, 1, 8, 8), eval_data=d, force=True)["fp32"]["accuracy"])
    same(res)
    same(each_kind(lambda d: onnx_summary(path, d)["accuracy"]))
    assert res["pair"] == pytest.approx(compress.evaluate(m, (X, Y)), abs=1e-3)


# ----------------------------------------------------------------------------- anything else: an InputError
NOT_DATA = {  # id: (call, the argument its error names)
    "evaluate-spec": (lambda: compress.evaluate(tiny(), "mnist5k"), "data"),
    "evaluate-inputs-only": (lambda: compress.evaluate(tiny(), X), "data"),
    "fit-dict": (lambda: compress.fit(tiny(), {"x": X, "y": Y}), "data"),
    "summarize-int": (lambda: compress.summarize(tiny(), (1, 1, 8, 8), 3, latency=False), "data"),
    "prune-object": (lambda: compress.prune_(tiny(), compress.ThresholdConfig(sparsity=0.5), object()), "train_data"),
    "prune-val-int": (lambda: compress.prune_(tiny(), compress.ThresholdConfig(sparsity=0.5), (X, Y), 7), "val_data"),
    "int8-calib-array": (
        lambda: compress.lower_int8(tiny(), compress.Int8Config(), calib_data=X.numpy()),
        "calib_data",
    ),
    "factorize-spec": (lambda: compress.factorize_(tiny(), compress.FactorizeConfig(rank=2), "digits"), "train_data"),
    "Context-val-float": (lambda: Context(val=1.5), "val"),
    "Context-calib-set-later": (lambda: setattr(Context(), "calib", "mnist5k"), "calib"),
    "pipeline-val-object": (lambda: compress.pipeline(tiny(), (X, Y), val_data=object()), "val_data"),
    "pipeline-int": (lambda: compress.pipeline(tiny(), 12), "data"),
}


@pytest.mark.parametrize("case", NOT_DATA)
def test_what_is_not_data_is_an_input_error_naming_the_argument(case):
    call, arg = NOT_DATA[case]
    with pytest.raises(InputError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith(f"{arg}: a ") and ACCEPTED in msg, msg
    assert ("compress.data.load(spec)" in msg) == (case.endswith("spec") or "later" in case)


@pytest.mark.parametrize(
    "call",
    [
        lambda: compress.run("prune", tiny(), compress.ThresholdConfig(sparsity=0.5), (X, Y)),
        lambda: ThresholdPruner(tiny(), compress.ThresholdConfig(sparsity=0.5), DataLoader(TensorDataset(X, Y))),
    ],
    ids=["run", "hooks"],
)
def test_data_in_place_of_a_context_is_an_input_error(call):
    with pytest.raises(
        InputError,
        match=r"^ctx: a (tuple|DataLoader) is not a compress.Context; give data as "
        r"Context\(train=\.\.\., val=\.\.\.\)",
    ):
        call()


def test_verbs_take_data_beside_a_context():
    """``prune_(m, cfg, train, ctx=Context(loss=...))`` fine-tunes on ``train`` (it was silently left out);
    the same data given twice is refused."""
    cfg = compress.ThresholdConfig(sparsity=0.5, rounds=1, allocate="std", finetune=FineTune(epochs=1, batch_size=16))
    a = compress.prune_(tiny(), cfg, (X, Y))
    b = compress.prune_(tiny(), cfg, DataLoader(TensorDataset(X, Y)), ctx=Context(loss=F.cross_entropy))
    same({"pair": a.state_dict(), "ctx": b.state_dict()})
    with pytest.raises(UsageError, match="train_data and ctx.train are both given"):
        compress.prune_(tiny(), cfg, (X, Y), ctx=Context(train=(X, Y)))
