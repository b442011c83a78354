"""Hostile recipes and --set values: every number a config takes is refused in one line, before any work.

Each numeric option declares its type and range on its field (``bounds.bounded``); one function checks them for
the library, the CLI, --set and recipes alike. Here the real CLI runs in a child process under an address-space
cap and a timeout (``hostile_harness``), with the values an attacker tried: 1e300, -1, nan, inf, 2.5 and true for
integers, strings for numbers, search lists of thousands, tables nested thousands deep, a 50 MB recipe, shifts
wider than the images. Several cases share one child (importing torch costs seconds), each timed on its own; the
child's peak memory covers them all. Beside the bombs, hypothesis builds recipe stages at random: only the
project's own errors may come out of the config constructors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress.recipe  # noqa: F401  (reads stages by their method: every built-in one is registered)
from compress.bounds import bound_of
from compress.config import FineTune, Select, stage_types
from compress.errors import CompressError, UsageError
from compress.recipe import MAX_CANDIDATES, Recipe, Stage
from tests.hostile_harness import CPU_S, Ended, run_python

PEAK_MB = 900  # the child's whole peak resident memory: torch, compress, the data (the attack took 4,500+)
CASE_SECONDS = 5.0  # CPU seconds of one refusal, torch already imported
STAGE = "[[stage]]\nmethod = 'threshold'\nsparsity = 0.5\n"
INT8 = "[[stage]]\nmethod = 'int8'\n"
IMAGES = 28  # the side of the test's images (as MNIST's)


def _cases_in_one_child(cases: list[list[str]]) -> tuple[Ended, list[Ended]]:
    """Run ``compress ARGS`` for each case in one capped child (torch imported first); each case's Ended has its
    own exit code, stderr and seconds, and the child's peak memory so far."""
    code = (
        "import contextlib, io, json, resource, sys, time, traceback\n"
        "import torch, compress.recipe\n"
        "from compress.cli import main\n"
        "res, cases = [], " + repr(cases) + "\n"
        "with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(cases[0])  # a warm-up: the command's modules imported, its first-call costs paid\n"
        "for args in cases:\n"
        "    e, t0 = io.StringIO(), time.process_time()\n"
        "    with contextlib.redirect_stderr(e), contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            code = main(args)\n"
        "        except BaseException:\n"
        "            code = -1\n"
        "            e.write(traceback.format_exc())\n"
        "    res.append([code, e.getvalue(), time.process_time() - t0,\n"
        "                _peak_kb() / 1024])\n"
        "print(json.dumps(res))\n"
    )
    child = run_python(code, cpu_s=CPU_S * max(1, len(cases)))
    assert child.code == 0, child
    each = [Ended(c, "", err, s, mb) for c, err, s, mb in json.loads(child.out.strip().splitlines()[-1])]
    return child, each


def _check(child: Ended, each: list[Ended], cases, said):
    for args, ended, words in zip(cases, each, said, strict=False):
        print(f"{ended.seconds:6.2f} s {ended.peak_mb:6.0f} MB  {ended.err.strip()[:150]}")
        assert ended.one_line_refusal, (args[-3:], ended)
        assert all(w in ended.err for w in words), (words, ended.err)
        assert ended.seconds < CASE_SECONDS, (args[-3:], ended)
    print(f"child: {child.seconds:.1f} s, peak {child.peak_mb:.0f} MB")
    assert child.peak_mb < PEAK_MB, child


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A LeNet-5 file and 64 28x28 images (.npz: read in milliseconds) in one folder."""
    import torch

    from compress.model_io import save_model
    from compress.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile_recipe")
    save_model(create_model("lenet5"), path / "lenet5.pt")
    rng = np.random.default_rng(0)
    np.savez(path / "d.npz", x=rng.random((64, 1, IMAGES, IMAGES), dtype=np.float32), y=rng.integers(0, 10, 64))
    return path


@pytest.fixture(scope="module")
def model_file(folder):
    return folder / "lenet5.pt"


@pytest.fixture(scope="module")
def data(folder):
    return str(folder / "d.npz")


def _deep_table(depth: int) -> str:
    return "x = " + "{a = " * depth + "1" + "}" * depth


# recipe body -> words its one-line refusal must hold (the option and its range)
RECIPES = {
    STAGE + "finetune = { epochs = 1e300 }\n": ["finetune.epochs", "[0, 10000]", "1e+300"],
    STAGE + "finetune = { epochs = -1 }\n": ["finetune.epochs", "[0, 10000]"],
    STAGE + "finetune = { epochs = nan }\n": ["finetune.epochs", "nan"],
    STAGE + "finetune = { lr = inf }\n": ["finetune.lr", "> 0 and <= 10"],
    STAGE + "finetune = { lr = -inf }\n": ["finetune.lr"],
    STAGE + "rounds = 1e9\n": ["rounds", "an integer in [1, 1000]"],
    STAGE + "rounds = 1000000000\n": ["rounds", "[1, 1000]"],
    STAGE + "rounds = true\n": ["rounds", "an integer", "True"],
    STAGE + "rounds = '3'\n": ["rounds", "an integer", "'3'"],
    STAGE + "finetune = { batch_size = 2.5 }\n": ["finetune.batch_size", "an integer in [1, 65536]"],
    STAGE + "finetune = { batch_size = 3.0 }\n": ["finetune.batch_size", "a float: write 3"],
    STAGE + "finetune = { augment = 200000 }\n": ["finetune.augment", "[0, 512]"],
    STAGE + "finetune = { augment = 2000 }\n": ["finetune.augment", "[0, 512]"],
    STAGE + "finetune = { seed = -1 }\n": ["finetune.seed"],
    STAGE + "finetune = { weight_decay = 1e300 }\n": ["finetune.weight_decay", "[0, 1]"],
    STAGE + "finetune = { epochs = " + "9" * 400 + " }\n": ["finetune.epochs"],
    STAGE + "finetune = { epochs = " + "9" * 5000 + " }\n": ["recipe"],  # more digits than Python converts
    STAGE + "finetune = { distill = 0 }\n": ["finetune.distill", "> 0"],
    STAGE + "finetune = { distill = -4 }\n": ["finetune.distill", "> 0 and <= 100"],
    STAGE + "finetune = { distill = 1e300 }\n": ["finetune.distill", "> 0 and <= 100"],
    STAGE + "finetune = { distill = 'hot' }\n": ["finetune.distill", "a number", "'hot'"],
    STAGE + "finetune = { distill = 4, distill_weight = 1.5 }\n": ["finetune.distill_weight", "[0, 1]"],
    STAGE + "finetune = { distill = 4, distill_weight = -0.1 }\n": ["finetune.distill_weight", "[0, 1]"],
    STAGE + "finetune = { distill = 4, distill_weight = nan }\n": ["finetune.distill_weight", "nan"],
    STAGE + "first_last_factor = 'half'\n": ["first_last_factor", "a number"],
    STAGE + "select = { names = [" + ", ".join(["'fc*'"] * 5000) + "] }\n": ["select.names", "at most 1000"],
    STAGE + "select = 5\n": ["select must be a table"],
    STAGE + "patience = 1e9\n": ["patience", "[1, 100]"],
    "[[stage]]\nmethod = 'threshold'\nsparsity = [" + ", ".join(["0.5"] * 10_000) + "]\n": [
        "sparsity",
        f"at most {MAX_CANDIDATES}",
    ],
    "[[stage]]\nmethod = 'threshold'\nsparsity = [0.5, 0.9, 1e300]\n": ["sparsity must be in [0, 1)", "1e+300"],
    "[[stage]]\nmethod = 'threshold'\nsparsity = {" + ", ".join(f"l{i} = 0.5" for i in range(20_000)) + "}\n": [
        "sparsity",
        "at most 10000",
    ],
    "[[stage]]\nmethod = 'quantize'\nbits = [8, 4, 2.5]\n": ["bits must be an integer in [2, 8]", "2.5"],
    "[[stage]]\nmethod = 'quantize'\nbits = {conv = 4, linear = 99}\n": ["bits['linear']", "[2, 8]"],
    "[[stage]]\nmethod = 'l1-filter'\nratio = -1\n": ["ratio as a count"],
    "[[stage]]\nmethod = 'l1-filter'\nratio = 0.5\ntarget_macs = inf\n": ["target_macs"],
    INT8 + "finetune = { epochs = [0, 1, 1e300] }\n": ["finetune.epochs", "[0, 10000]"],
    INT8 + "calib_samples = 1099511627776\n": ["calib_samples", "[1, 1048576]"],
    INT8 + "percentile = nan\n": ["percentile", "[99, 100]"],
    "max_accuracy_drop = inf\n" + STAGE: ["max_accuracy_drop", "[0, 100]"],
    STAGE * 1000: ["1,000 stages", "at most 32"],
    _deep_table(5000) + "\n" + STAGE: ["nested too deeply"],
    "x = " + "[" * 5000 + "]" * 5000 + "\n" + STAGE: ["nested too deeply"],
}


@pytest.fixture(scope="module")
def ran(model_file, data, tmp_path_factory):
    """Every recipe of RECIPES, then a 50 MB one, through `compress pipeline` in one capped child: its folder, the
    cases, what each ended with and the child."""
    out = tmp_path_factory.mktemp("recipes")
    cases = []
    for i, body in enumerate(RECIPES):
        p = out / f"r{i}.toml"
        p.write_text(body)
        cases.append(
            ["pipeline", str(model_file), "--train-data", data, "--recipe", str(p), "--no-latency"]
            + ["-o", str(out / f"out{i}.cpz")]
        )
    big = out / "big.toml"
    with open(big, "w") as f:
        f.write(STAGE)
        line = "# " + "x" * 1000 + "\n"
        f.write(line * (50 * 1024 * 1024 // len(line)))
    cases.append(["pipeline", str(model_file), "--train-data", data, "--recipe", str(big), "-o", str(out / "out.cpz")])
    child, each = _cases_in_one_child(cases)
    return out, cases, each, child


def test_hostile_recipes_are_refused_in_one_line_before_any_work(ran):
    out, cases, each, child = ran
    n = len(RECIPES)
    _check(child, each[:n], cases[:n], list(RECIPES.values()))
    assert not list(out.glob("out*"))  # nothing written, no checkpoint begun


# --set value -> words its refusal must hold
SETS = {
    "rounds=1e9": ["rounds", "[1, 1000]"],
    "rounds=true": ["rounds", "an integer"],
    "finetune.epochs=1e300": ["finetune.epochs", "[0, 10000]"],
    "finetune.epochs=nan": ["finetune.epochs", "nan"],
    "finetune.epochs=-inf": ["finetune.epochs"],
    "finetune.batch_size=2.5": ["finetune.batch_size", "an integer"],
    "finetune.batch_size=0": ["finetune.batch_size", "[1, 65536]"],
    "finetune.augment=2000": ["finetune.augment", "[0, 512]"],
    "finetune.lr=fast": ["finetune.lr", "a number", "'fast'"],
    "finetune.seed=99999999999999999999999": ["finetune.seed"],
    "finetune=5": ["finetune must be a table"],
    "first_last_factor=[0.5, 0.6]": ["first_last_factor", "a list of 2"],
    "sparsity={conv = 1.5}": ["sparsity['conv']", "[0, 1)"],
    "rounds=" + "[" * 3000 + "]" * 3000: ["--set rounds"],
}


def test_hostile_set_values_are_refused_in_one_line(tmp_path, model_file, data):
    cases = [
        [
            "prune",
            str(model_file),
            "--sparsity",
            "0.5",
            "--epochs",
            "0",
            "--no-latency",
            "--set",
            s,
            "-o",
            str(tmp_path / f"out{i}.pt"),
        ]
        for i, s in enumerate(SETS)
    ]
    child, each = _cases_in_one_child(cases)
    _check(child, each, cases, list(SETS.values()))
    assert not list(tmp_path.glob("out*"))


def test_shifts_wider_than_the_images_are_refused_where_model_and_data_meet(tmp_path, model_file, data):
    """augment <= 512 passes the field's range; 100 pixels on 28x28 images is refused once the data is known,
    by the pipeline and a single command alike, before any work."""
    p = tmp_path / "r.toml"
    p.write_text(STAGE + "finetune = { augment = 100, epochs = 1 }\n")
    cases = [
        [
            "pipeline",
            str(model_file),
            "--train-data",
            data,
            "--recipe",
            str(p),
            "--no-latency",
            "-o",
            str(tmp_path / "out.cpz"),
        ],
        [
            "prune",
            str(model_file),
            "--sparsity",
            "0.5",
            "--train-data",
            data,
            "--epochs",
            "1",
            "--no-latency",
            "--set",
            "finetune.augment=100",
            "-o",
            str(tmp_path / "out.pt"),
        ],
    ]
    child, each = _cases_in_one_child(cases)
    _check(child, each, cases, [["finetune.augment = 100", f"{IMAGES} pixels"]] * 2)
    assert not list(tmp_path.glob("out*"))


def test_a_50_mb_recipe_is_refused_unread(ran):
    out, _, each, _ = ran
    ended = each[-1]
    print(ended)
    assert ended.one_line_refusal and "at most 1,048,576" in ended.err, ended
    assert ended.peak_mb < PEAK_MB, ended  # (the child's peak once it ended: a bound on its own)
    assert not (out / "out.cpz").exists()


# ----------------------------------------------------------------------------- in process
def test_every_numeric_field_declares_its_range():
    """No number reaches a method unchecked: each int / float / bool field of every config, part and recipe has a
    ``Bound`` on the field itself."""
    classes = [*stage_types().values(), Select, FineTune, Stage, Recipe]
    missing = [
        f"{c.__name__}.{f.name}"
        for c in classes
        for f in dataclasses.fields(c)
        if any(t in str(f.type) for t in ("int", "float", "bool"))
        and "Callable" not in str(f.type)
        and bound_of(c, f.name) is None
    ]
    assert not missing, missing


def test_library_errors_name_the_option_and_valid_edges_still_pass():
    for kw, words in [
        ({"epochs": 1e300}, "finetune.epochs must be in [0, 10000]"),
        ({"batch_size": True}, "finetune.batch_size must be an integer"),
        ({"batch_size": 64.0}, "a float: write 64"),
        ({"lr": math.nan}, "finetune.lr must be a number > 0 and <= 10"),
    ]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
            FineTune(**kw)
    ok = FineTune(epochs=10_000, lr=10, batch_size=np.int64(65_536), augment=512, seed=2**31 - 1, distill=100)
    assert ok.batch_size == 65_536
    assert FineTune(epochs=3).epochs == 3  # a TOML int for a float option reads as before
    with pytest.raises(ValueError, match="finetune.epochs"):
        dataclasses.replace(ok, epochs=-1)  # however a config is made, it is checked


_CFG_FIELDS = sorted({f.name for c in stage_types().values() for f in dataclasses.fields(c)})
_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "conv",
            "linear",
            "_default",
            "adam",
            "sgd",
            "kmeans",
            "mmse",
            "l1",
            "minmax",
            "histogram",
            "percentile",
            "std",
            "geometric",
            "fc*",
        ]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["conv", "linear", "_default", "fc1", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_part = {
    "finetune": st.dictionaries(
        st.sampled_from([f.name for f in dataclasses.fields(FineTune)] + ["zz"]), _values, max_size=4
    ),
    "select": st.dictionaries(
        st.sampled_from([f.name for f in dataclasses.fields(Select) if f.name != "filter_fn"]), _values, max_size=3
    ),
}
_options = st.dictionaries(st.sampled_from(_CFG_FIELDS + ["patience", "zz"]), _values, max_size=5).flatmap(
    lambda d: st.fixed_dictionaries({k: _part[k] if k in _part else st.just(v) for k, v in d.items()})
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(stage_types())), options=_options, direct=st.booleans())
def test_fuzzed_recipe_stages_raise_only_our_errors(method, options, direct):
    """A recipe stage of random options (numbers of every size and kind, lists, tables) through the stage reader
    and straight through the config constructor: a config, or the project's own error -- nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if direct:
                opts = {k: v for k, v in options.items() if k != "patience"}
                cfg = stage_types()[method].from_options(opts)
                assert cfg.to_dict()["type"]
            else:
                Stage.from_dict({"method": method, **options})
        except (ValueError, CompressError) as e:
            if not direct:
                assert isinstance(e, UsageError)
            assert "\n" not in str(e) and len(str(e)) < 400, str(e)


def test_search_list_elements_are_checked_by_the_same_declaration():
    with pytest.raises(UsageError, match=r"finetune.epochs must be in \[0, 10000\]"):
        Stage.from_dict({"method": "int8", "finetune": {"epochs": [0, 1, 20_000]}})
    with pytest.raises(UsageError, match=f"at most {MAX_CANDIDATES}"):
        Stage.from_dict({"method": "threshold", "sparsity": [0.5] * (MAX_CANDIDATES + 1)})
    assert (
        len(Stage.from_dict({"method": "threshold", "sparsity": [0.5] * MAX_CANDIDATES}).candidates) == MAX_CANDIDATES
    )


def test_documented_recipes_read_unchanged():
    for p in sorted((Path(__file__).resolve().parents[1] / "docs/recipes").glob("*.toml")):
        assert Recipe.load(p).stages


_THRESHOLD = {"type": "ThresholdConfig", "version": 2, "sparsity": 0.5}


@pytest.mark.parametrize(
    "stage,said",
    [
        ({"method": "threshold", "candidates": []}, "candidates must be a list of at least one config"),
        ({"method": "threshold", "candidates": {"a": 1}}, "candidates must be a list"),
        ({"method": "threshold", "candidates": [_THRESHOLD] * (MAX_CANDIDATES + 1)}, f"at most {MAX_CANDIDATES}"),
        (
            {"method": "threshold", "candidates": [{**_THRESHOLD, "type": "QuantConfig"}]},
            "takes a table of type 'ThresholdConfig'",
        ),
        ({"method": "threshold", "candidates": [5]}, "takes a table of type 'ThresholdConfig'"),
        ({"method": "threshold", "candidates": [{**_THRESHOLD, "version": 99}]}, "newer than this compress reads"),
        ({"method": "threshold", "candidates": [{**_THRESHOLD, "rounds": 1e300}]}, "rounds must be an integer"),
        (
            {"method": "threshold", "candidates": [{**_THRESHOLD, "select": {"filter_fn": "os.system"}}]},
            "select: unknown option(s) filter_fn",
        ),
        (
            {"method": "threshold", "candidates": [_THRESHOLD], "sparsity": 0.9},
            "holds method, patience and candidates only",
        ),
        ({"method": "threshold", "candidates": [_THRESHOLD], "patience": 0}, "patience must be"),
    ],
)
def test_the_candidates_form_is_checked_as_a_file_is(stage, said):
    """The form ``to_dict`` writes (a pipeline summary's recipe) comes from a file too: each candidate is read by
    ``Config.from_dict`` with the same declared ranges, and anything off is one line naming the stage."""
    with pytest.raises(UsageError, match=re.escape(said)) as e:
        Recipe.from_dict({"stages": [stage]})
    assert "\n" not in str(e.value) and "stage 1" in str(e.value)


def test_stages_are_given_once():
    with pytest.raises(UsageError, match="give its stages once"):
        Recipe.from_dict(
            {
                "stage": [{"method": "threshold", "sparsity": 0.5}],
                "stages": [{"method": "threshold", "candidates": [_THRESHOLD]}],
            }
        )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(stage_types())), candidates=st.lists(_options, max_size=3), typed=st.booleans())
def test_fuzzed_candidates_raise_only_our_errors(method, candidates, typed):
    """Random candidates in the form ``to_dict`` writes: a stage, or one line of UsageError -- nothing else."""
    name = stage_types()[method].__name__
    cands = [{"type": name, **c} if typed else c for c in candidates]
    try:
        Stage.from_dict({"method": method, "candidates": cands})
    except UsageError as e:
        assert "\n" not in str(e) and len(str(e)) < 400, str(e)
