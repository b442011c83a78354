"""Every registered method config, through every way a user reaches it: JSON, a recipe, their own training loop
(the method object's hooks) and a saved file that loads without trust."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import compress
from compress import data as data_mod
from compress.config import Config, FineTune, method_for, stage_types
from compress.meta import get_meta
from compress.method import Context
from compress.model_io import load_model, save_model
from compress.models import create_model
from compress.recipe import Stage

# the options a config needs beside its defaults, and a few that differ from them, per stage name
SETTINGS = {
    "threshold": {"sparsity": 0.6, "rounds": 2},
    "l1-filter": {"ratio": 0.25, "importance": "l2"},
    "channel-union": {"lasso_ratio": 1.5, "reconfig_interval": 1},
    "quantize": {"bits": 5, "scheme": "pow2"},
    "factorize": {"energy": 0.95},
    "int8": {"observer": "percentile", "percentile": 99.9},
}


def test_every_registered_method_has_settings_here():
    assert set(stage_types()) == set(SETTINGS), "a new method: add it to SETTINGS so it is tested below"


def _config(name: str) -> Config:
    return stage_types()[name].from_options({**SETTINGS[name], "finetune": {"epochs": 0.0}})


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_config_round_trips_through_json_and_a_recipe(name):
    cfg = _config(name)
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert Config.from_dict({"type": type(cfg).__name__, **cfg.changes()}) == cfg  # what a file's history keeps
    stage = Stage.from_dict(
        {"method": name, **{k: v for k, v in cfg.changes().items() if k not in ("type", "version")}}
    )
    assert stage.name == name and stage.candidates == (cfg,)
    as_toml = {"method": name, **SETTINGS[name], "finetune": {"epochs": 0.0}}  # as a recipe file spells it
    assert Stage.from_dict(as_toml).candidates == (cfg,)
    assert [Config.from_dict(c) for c in json.loads(json.dumps(stage.to_dict()))["candidates"]] == [cfg]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_config_drives_a_users_own_loop_and_the_result_reloads_without_trust(name, tmp_path):
    """The method object in a plain PyTorch loop (attach, penalty, after_backward, step, finalize), then the
    model saved and loaded back without trust, its history naming the stage."""
    torch.manual_seed(0)
    ds = data_mod.load("digits?limit=256")
    model = create_model("resnet8", width=0.5)
    cfg = _config(name)
    method = method_for(cfg, cfg.verb)(model, cfg, Context(train=ds, input_shape=(1, 1, 8, 8)))
    method.attach()
    params = method.parameters() or method.model.parameters()
    opt = torch.optim.SGD(params, lr=0.01)
    x, y = ds.batch(torch.arange(64))
    for _ in range(3):
        loss = F.cross_entropy(method.model(x), y)
        pen = method.penalty()
        (loss + pen if pen is not None else loss).backward()
        method.after_backward()
        opt.step()
        opt.zero_grad()
        if method.step(0.01):
            opt = torch.optim.SGD(method.parameters() or method.model.parameters(), lr=0.01)
    model = method.finalize()
    out = model.eval()(x)
    assert out.shape == (64, 10) and bool(torch.isfinite(out).all())
    save_model(model, tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")  # no trust: compress's own classes and data only
    assert torch.allclose(again.eval()(x), out, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_config_through_run_names_itself_in_the_file(name, tmp_path):
    from compress.method import run

    ds = data_mod.load("digits?limit=256")
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.5)
    cfg = stage_types()[name].from_options({**SETTINGS[name], "finetune": FineTune(epochs=0.5)})
    res = run(cfg.verb, model, cfg, Context(train=ds, input_shape=(1, 1, 8, 8)))
    save_model(res.model, tmp_path / "m.pt")
    history = get_meta(load_model(tmp_path / "m.pt"))["history"]
    assert history[-1]["stage"] == name
    assert Config.from_dict(history[-1]["config"]) == cfg


def test_set_reaches_any_option_without_a_flag(cli, tmp_path, lenet5_trained):
    """--set key=value (TOML values, part.key for select / finetune) for options the command has no flag for."""
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "prune",
        tmp_path / "m.pt",
        "--sparsity",
        "0.5",
        "--epochs",
        "0",
        "--no-latency",
        "--set",
        "rounds=1",
        "--set",
        "first_last_factor=1.0",
        "--set",
        'select.exclude=["fc2"]',
        "-o",
        tmp_path / "p.pt",
    )
    assert r.code == 0, r.err
    m = load_model(tmp_path / "p.pt")
    cfg = Config.from_dict(get_meta(m)["history"][-1]["config"])
    assert cfg.rounds == 1 and cfg.first_last_factor == 1.0 and cfg.select.exclude == ("fc2",)
    assert bool((m.fc2.weight != 0).all())  # excluded: untouched
    for bad, said in (
        (["--set", "roundz=2"], "unknown option"),
        (["--set", "rounds"], "key=value"),
        (["--set", "finetune.lrr=1"], "finetune: unknown option"),
        (["--set", "rounds=0"], "rounds"),
    ):
        r = cli("prune", tmp_path / "m.pt", "--sparsity", "0.5", "--epochs", "0", *bad, "-o", tmp_path / "q.pt")
        assert r.code == 2 and said in r.err and len(r.err.strip().splitlines()) == 1, (bad, r.err)
        assert not (tmp_path / "q.pt").exists()


def _changed(before: dict, model) -> set[str]:
    """Layers whose weight changed (or were replaced) since ``before`` (a state dict)."""
    after = model.state_dict()
    return {k.rpartition(".")[0] for k, v in before.items() if k not in after or not torch.equal(v, after[k])}


@pytest.mark.parametrize("verb", ["prune", "quantize", "factorize"])
def test_filter_fn_is_an_argument_of_the_verb_not_a_config_field(verb):
    """A config is data (no callable in it); the code that chooses layers goes to the verb, to ``run`` or through
    the Context to a method object, and narrows the config's ``select`` the same way each time."""
    from compress.config import Select
    from compress.errors import UsageError
    from compress.method import run

    assert "filter_fn" not in {f.name for f in dataclasses.fields(Select)}
    cfg = {
        "prune": compress.ThresholdConfig(
            sparsity=0.5, rounds=1, finetune=FineTune(epochs=0), select=Select(spare_first_last=False)
        ),
        "quantize": compress.QuantConfig(bits=3),
        "factorize": compress.FactorizeConfig(rank=2, select=Select(spare_first_last=False)),
    }[verb]
    seen = []

    def only_conv2(module, fqn):
        seen.append(fqn)
        return fqn == "conv2"

    def lenet():
        torch.manual_seed(0)
        return create_model("lenet5")

    before = lenet().state_dict()
    by_verb = getattr(compress, f"{verb}_")(lenet(), cfg, filter_fn=only_conv2)
    assert _changed(before, by_verb) == {"conv2"} and set(seen) == {"conv1", "conv2", "fc1", "fc2"}
    whole = getattr(compress, f"{verb}_")(lenet(), cfg)  # the same config without it: every selected layer
    assert _changed(before, whole) >= {"conv1", "conv2", "fc1"}
    by_run = run(verb, lenet(), cfg, filter_fn=only_conv2).model
    by_ctx = method_for(cfg, verb)(lenet(), cfg, Context(filter_fn=only_conv2)).run().model
    for m in (by_run, by_ctx):
        assert all(torch.equal(v, by_verb.state_dict()[k]) for k, v in m.state_dict().items())
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # nothing of the callable in it
    with pytest.raises(UsageError, match="filter_fn and ctx.filter_fn are both given"):
        run(verb, lenet(), cfg, Context(filter_fn=only_conv2), filter_fn=only_conv2)
    with pytest.raises(UsageError, match="filter_fn must be a callable"):
        getattr(compress, f"{verb}_")(lenet(), cfg, filter_fn="conv2")


# non-default values of every option of the built-in configs and of their parts (per-layer tables, counts, None)
OTHER_VALUES: dict[str, list] = {
    "sparsity": [0.9, {"conv": 0.6, "fc1": 0.95, "_default": 0.5}, None],
    "quality": [1.5, {"linear": 2.0}],
    "allocate": ["std"],
    "rounds": [1, 7],
    "schedule": ["geometric"],
    "first_last_factor": [0.8, 1.0],
    "ratio": [0.3, 7, {"conv1": 0.2, "_default": 0.5}],
    "min_channels": [4],
    "round_to": [8],
    "target_macs": [0.5, 1_000_000],
    "target_params": [0.25, 50_000],
    "target_latency": [0.5],
    "importance": ["l2", "bn-scale", "taylor", "group-lasso"],
    "lasso_ratio": [1.5, 0.0],
    "cost_weight": [0.5, 4.0],
    "reconfig_interval": [3],
    "zero_tol": [1e-6],
    "rel_tol": [0.2],
    "bits": [4, 2, {"conv": 6, "linear": 4, "fc2": 8}],
    "scheme": ["mmse", "kmeans", "pow2"],
    "per_channel": [False],
    "symmetric": [False],
    "bias_bits": [None, 4],
    "rd_lambda": [0.1, 10.0],
    "energy": [0.9, None],
    "rank_ratio": [0.5],
    "rank": [4],
    "observer": ["percentile", "minmax", "mse"],
    "engine": ["fx", "pt2e"],
    "percentile": [99.9],
    "calib_samples": [128],
    "freeze": [0.5, 0.0],
    "max_accuracy_drop": [0.5, 0],
    "max_float_layers": [0, 100],
}
PART_VALUES: dict[str, dict[str, list]] = {
    "finetune": {
        "epochs": [2.5, 3],
        "lr": [0.01],
        "optimizer": ["sgd", "adam"],
        "batch_size": [32],
        "augment": [2, 0, None],
        "distill": [4.0],
        "distill_weight": [0.7],
        "seed": [3],
        "weight_decay": [1e-4],
    },
    "select": {
        "types": [("conv",), ("linear",)],
        "names": [("fc*", "conv1")],
        "exclude": [("fc2",)],
        "spare_first_last": [False, True],
    },
}


def _builtin_configs() -> list[type[Config]]:
    from compress.config import _CONFIG_TYPES

    _ = compress.Config  # what a user reads configs with: every built-in config is registered

    return sorted((c for c in _CONFIG_TYPES.values() if c.__module__.startswith("compress.")), key=lambda c: c.__name__)


def _round_trips(cfg: Config) -> None:
    d = cfg.to_dict()
    assert d["type"] == type(cfg).__name__ and d["version"] == type(cfg).version
    assert Config.from_dict(d) == cfg
    assert Config.from_dict(json.loads(json.dumps(d))) == cfg  # as a file holds it
    assert Config.from_dict(cfg.changes()) == cfg  # as a file's history keeps it


def _variants(cls: type[Config]):
    """(the config with one option changed, that option) for every option of ``cls`` and of its parts that can be
    changed alone; ``cls`` needs one of its search options given (``_config``'s)."""
    base = _config(cls.stage_name)
    for f in dataclasses.fields(cls):
        if f.name in PART_VALUES:
            for k, values in PART_VALUES[f.name].items():
                for v in values:
                    yield (
                        dataclasses.replace(base, **{f.name: dataclasses.replace(getattr(base, f.name), **{k: v})}),
                        f"{f.name}.{k}",
                    )
            continue
        for v in OTHER_VALUES.get(f.name, []):  # none: the check below names the option
            # exclusive with an option the base sets: that option cleared, or set to one that allows it
            for also in (
                {},
                {"sparsity": None, "quality": None},
                {"energy": None, "rank_ratio": None, "rank": None},
                {"scheme": "minmax"},
            ):
                changes = {
                    k: x for k, x in also.items() if k in {g.name for g in dataclasses.fields(cls)} and k != f.name
                }
                try:
                    yield dataclasses.replace(base, **{**changes, f.name: v}), f.name
                    break
                except ValueError:
                    continue


def test_every_builtin_config_round_trips_with_every_option_changed():
    """``Config.from_dict(c.to_dict()) == c`` for each built-in config: its defaults, and each of its options and its
    parts' set to other values in turn (JSON in between, and the short form a file's history keeps)."""
    classes = _builtin_configs()
    assert {c.__name__ for c in classes} >= {
        "ThresholdConfig",
        "L1FilterConfig",
        "ChannelUnionConfig",
        "QuantConfig",
        "Int8Config",
        "FactorizeConfig",
    }
    for cls in classes:
        changed = set()
        for cfg, option in _variants(cls):
            _round_trips(cfg)
            changed.add(option)
        every = {f.name for f in dataclasses.fields(cls) if f.name not in PART_VALUES}
        every |= {f"{p}.{g.name}" for p in PART_VALUES for g in dataclasses.fields(getattr(cls(**_needed(cls)), p))}
        assert changed == every, f"{cls.__name__}: give OTHER_VALUES / PART_VALUES for {sorted(every - changed)}"


def _needed(cls: type[Config]) -> dict:
    return {k: v for k, v in SETTINGS[cls.stage_name].items() if k in ("sparsity", "energy")}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_configs_of_many_changed_options_round_trip(data):
    """Several options changed at once (any combination the config accepts) round-trip too."""
    cls = data.draw(st.sampled_from(_builtin_configs()))
    names = [f.name for f in dataclasses.fields(cls) if f.name in OTHER_VALUES or f.name in PART_VALUES]
    opts: dict = {}
    for name in data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))):
        if name in PART_VALUES:
            part = PART_VALUES[name]
            keys = data.draw(st.lists(st.sampled_from(sorted(part)), unique=True, min_size=1))
            opts[name] = {k: data.draw(st.sampled_from(part[k])) for k in keys}
        else:
            opts[name] = data.draw(st.sampled_from(OTHER_VALUES[name]))
    try:
        cfg = cls.from_options(opts)
    except ValueError:  # a combination the config refuses (two exclusive options, none of them)
        assume(False)
    _round_trips(cfg)


def test_a_config_of_an_unknown_version_or_type_is_refused():
    d = compress_configs()["threshold"].to_dict()
    with pytest.raises(ValueError, match="ThresholdConfig version 3 is newer than this compress reads \\(2\\)"):
        Config.from_dict({**d, "version": 3})
    for bad in (0, True, "2", 2.0):
        with pytest.raises(ValueError, match="version must be a positive integer"):
            Config.from_dict({**d, "version": bad})
    assert Config.from_dict({**d, "version": 1}) == Config.from_dict(d)  # an earlier version still reads
    with pytest.raises(ValueError, match="unknown config type 'NoSuchConfig'; known: .*ThresholdConfig"):
        Config.from_dict({**d, "type": "NoSuchConfig"})


def compress_configs() -> dict[str, Config]:
    return {name: _config(name) for name in SETTINGS}


def test_import_compress_alone_reads_every_builtin_config():
    """In a fresh interpreter, ``import compress`` and nothing else: ``compress.Config.from_dict`` knows every built-in
    type (they register where they are defined; the public ``Config`` loads them), and torch is not imported before."""
    dicts = [json.loads(json.dumps(_config(n).to_dict())) for n in sorted(SETTINGS)]
    code = (
        "import json, sys\nimport compress\nassert 'torch' not in sys.modules\n"
        f"ds = json.loads({json.dumps(json.dumps(dicts))})\n"
        "print(json.dumps([compress.Config.from_dict(d).to_dict() for d in ds]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == dicts
