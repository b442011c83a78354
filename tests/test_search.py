"""The pipeline and its recipes: every shipped recipe runs, bad recipes are refused, one precedence."""

import copy
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from compress import data as data_mod
from compress.config import FineTune
from compress.cpz.container import decode_model, encode_model
from compress.errors import InputError, UsageError
from compress.meta import set_meta
from compress.models import create_model
from compress.recipe import DEFAULT_RECIPE, Recipe
from compress.scoring import errors_allowed, samples_for
from compress.search import pipeline
from compress.train import fit

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("docs", "recipes").glob("*.toml"))
DEMO = next(p for p in RECIPES if p.stem == "demo")  # the quick one


@pytest.fixture(scope="module")
def digits():
    return data_mod.load("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """A LeNet-300-100 and a small ResNet trained on 90% of the 8x8 digits."""
    tr, _ = data_mod.split(digits, 0.1, seed=0)
    torch.manual_seed(0)
    mlp = create_model("lenet300", input_size=8)
    fit(mlp, tr, FineTune(epochs=6, lr=2e-3))
    torch.manual_seed(0)
    cnn = create_model("resnet8", width=0.5)
    fit(cnn, tr, FineTune(epochs=4, lr=3e-3, batch_size=32))
    return {"mlp": mlp, "cnn": cnn}


# gentle.toml is the default recipe with two gentler first candidates (test_the_gentle_recipe_is_the_default_
# starting lower): it runs as deep-compression.toml does, in twice the time
RUN = [p for p in RECIPES if p.stem != "gentle"]


def _save_mlp(trained, path):
    """The trained digits MLP, with its input shape recorded, saved where a CLI test reads it."""
    from compress.model_io import save_model

    m = copy.deepcopy(trained["mlp"])
    set_meta(m, input_shape=[1, 1, 8, 8])
    save_model(m, path)


@pytest.mark.parametrize("path", RUN, ids=[p.stem for p in RUN])
def test_every_shipped_recipe_runs(path, trained, digits, tmp_path):
    from compress.model_io import load_model, save_model
    from compress.quantize.int8 import Int8Model

    recipe = Recipe.load(path)
    structured = any(s.candidates[0].stage_name in ("l1-filter", "channel-union") for s in recipe.stages)
    model = copy.deepcopy(trained["cnn" if structured else "mlp"])
    m, summary = pipeline(model, digits, recipe, max_accuracy_drop=2.0)
    assert len(summary.stages) == len(recipe.stages)
    for st in summary.stages:
        assert st.tried, st.stage
        if st.kept is not None:  # what was kept passed the budget test
            assert st.kept.within_budget and st.kept.drop + st.kept.se <= 2.0
    x = digits.x[:16]
    if isinstance(m, Int8Model):  # an int8 stage: the file is an INT8 .pt, 1 byte a weight
        save_model(m, tmp_path / "m.pt")
        assert (tmp_path / "m.pt").stat().st_size == summary.cpz_bytes and summary.ratio > 2  # 20k weights + overhead
        assert torch.equal(load_model(tmp_path / "m.pt")(x), m(x))  # the file is the model that was judged
        return
    blob, _ = encode_model(copy.deepcopy(m))
    assert len(blob) == summary.cpz_bytes and summary.ratio > 3
    assert torch.equal(decode_model(blob)(x), m(x))  # the file is the model that was judged


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_round_trips(path):
    """``Recipe.from_dict(r.to_dict()) == r``, through JSON too (as a summary file holds it)."""
    import json

    recipe = Recipe.load(path)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    distilled = recipe.with_finetune(distill=4.0)  # candidates that differ from what a file can list still read back
    assert Recipe.from_dict(json.loads(json.dumps(distilled.to_dict()))) == distilled


def test_a_summarys_recipe_runs_again_to_the_same_decisions(trained, digits):
    """The recipe a pipeline's summary holds, read back, is the recipe that ran: run again, it tries the same
    candidates, keeps the same ones and writes the same bytes."""
    import json

    recipe = {
        "stage": [
            {
                "method": "threshold",
                "sparsity": [0.3, 0.5, 0.97],
                "rounds": 1,
                "patience": 1,
                "finetune": {"epochs": 0.3, "seed": 1},
                "select": {"exclude": ["fc3"]},
            },
            {"method": "quantize", "scheme": "kmeans", "bits": [6, 3], "rd_lambda": [0, 0.3], "per_channel": True},
        ],
        "max_accuracy_drop": 2.0,
        "val_fraction": 0.25,
    }

    def decisions(s):
        return [(st.stage, st.kept and st.kept.value, [(t.value, t.verdict) for t in st.tried]) for st in s.stages]

    _, first = pipeline(copy.deepcopy(trained["mlp"]), digits, recipe, latency=False)
    quant = first.stages[1]  # two searched options: each candidate's value names both
    assert quant.search_key == "bits, rd_lambda" and [t.value for t in quant.tried] == [
        {"bits": b, "rd_lambda": x} for b in (6, 3) for x in (0, 0.3)
    ]
    verdicts = [t.verdict.partition(":")[0] for st in first.stages for t in st.tried]
    assert "kept" in verdicts and len(set(verdicts)) >= 3, verdicts  # decisions that could come out otherwise
    again = Recipe.from_dict(json.loads(json.dumps(first.recipe)))
    assert again == Recipe.from_dict(recipe)
    _, second = pipeline(copy.deepcopy(trained["mlp"]), digits, again, latency=False)
    assert decisions(second) == decisions(first) and second.cpz_bytes == first.cpz_bytes
    assert second.budget_pt == 2.0 and second.validation == first.validation
    assert second.recipe == first.recipe


SUMMARY_KEYS = [
    "stopped",
    "kept_nothing",
    "budget_pt",
    "confidence",
    "base_accuracy",
    "final_accuracy",
    "dense_bytes",
    "cpz_bytes",
    "ratio",
    "timeline",
    "layer_bytes",
    "graph_note",
    "stages",
    "input_shape",
    "recipe",
    "validation",
    "metric",
]


def test_the_summary_is_typed_and_its_json_keeps_its_keys(trained, digits):
    """``pipeline`` returns a ``PipelineSummary``; its ``to_dict`` is the JSON the report and ``--json`` hold, with
    the keys in the order they always had, the optional numbers only when measured."""
    import json

    from compress.search_results import PipelineSummary

    one = {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}]}
    _, s = pipeline(
        copy.deepcopy(trained["mlp"]),
        digits,
        one,
        max_accuracy_drop=3.0,
        latency=False,
        test_data=digits.subset(range(200)),
    )
    assert isinstance(s, PipelineSummary) and not s.kept_nothing
    d = json.loads(json.dumps(s.to_dict()))
    assert list(d) == SUMMARY_KEYS + ["candidate_bytes_error", "test_accuracy_before", "test_accuracy_after"]
    assert (
        d["cpz_bytes"] == s.cpz_bytes
        and d["stages"] == [st.to_dict() for st in s.stages]
        and d["timeline"] == s.timeline
    )
    assert d["stages"][0]["kept"] == d["stages"][0]["tried"][-1] and list(d["stages"][0]) == [
        "stage",
        "search_key",
        "kept",
        "tried",
        "bytes",
        "accuracy",
        "seconds",
    ]
    assert list(d["stages"][0]["kept"]) == [
        "value",
        "options",
        "accuracy",
        "drop",
        "se",
        "within_budget",
        "verdict",
        "bytes",
    ]
    assert d["test_accuracy_after"] == s.timeline[-1]["test_accuracy"]
    harsh = {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 2}]}
    _, s = pipeline(copy.deepcopy(trained["mlp"]), digits, harsh, latency=False, max_accuracy_drop=0.0)
    assert s.kept_nothing and list(s.to_dict()) == SUMMARY_KEYS  # nothing kept, no test data: neither is there


def test_default_recipe_is_the_documented_one():
    assert (
        Recipe.load(Path(__file__).resolve().parents[1] / "docs/recipes/deep-compression.toml").stages
        == DEFAULT_RECIPE.stages
    )


def test_the_gentle_recipe_is_the_default_starting_lower():
    """What a run that keeps nothing suggests: the default's stages, the threshold search begun at 50% sparsity."""
    import dataclasses

    gentle = Recipe.load(next(p for p in RECIPES if p.stem == "gentle"))
    first, rest = gentle.stages[0], DEFAULT_RECIPE.stages[0]
    assert [c.searched() for c in first.candidates] == [0.5, 0.75] + [c.searched() for c in rest.candidates]
    assert all(dataclasses.replace(c, sparsity=0.9) == rest.candidates[0] for c in first.candidates)
    assert gentle.stages[1:] == DEFAULT_RECIPE.stages[1:]


@pytest.mark.parametrize(
    "body,match",
    [
        ("[[stage]]\nmethod = 'threshold'\nsparsity = 0.9\nconfidence = 1.0\n", "unknown option"),
        ("stage = [5]\n", "must be a table"),
        ("val_fraction = 5.0\n[[stage]]\nmethod = 'quantize'\nscheme = 'kmeans'\nbits = 4\n", "val_fraction"),
        ("max_accuracy_drop = 'x'\n[[stage]]\nmethod = 'quantize'\nscheme = 'kmeans'\nbits = 4\n", "max_accuracy_drop"),
        ("max_accuracy_drop = nan\n[[stage]]\nmethod = 'quantize'\nscheme = 'kmeans'\nbits = 4\n", "max_accuracy_drop"),
        ("[[stage]]\nmethod = 'threshold'\nsparsity = []\n", "no candidate"),
        ("[[stage]]\nmethod = 'treshold'\nsparsity = 0.5\n", "did you mean threshold"),
        ("[[stage]]\nmethod = 'threshold'\nsparsity = 1.5\n", "sparsity must be in"),
        ("[[stage]]\nmethod = 'threshold'\nsparsity = 0.5\nfinetune = { epoch = 3 }\n", "finetune: unknown option"),
        ("[[stage]]\nmethod = 'threshold'\nsparsity = 0.5\npatience = 0\n", "patience"),
        ("version = 99\n[[stage]]\nmethod = 'quantize'\nscheme = 'kmeans'\nbits = 4\n", "newer"),
        ("x = 1\n[[stage]]\nmethod = 'quantize'\nscheme = 'kmeans'\nbits = 4\n", "unknown key"),
        ("[[stage]\n", "recipe"),
    ],
)
def test_bad_recipes_are_refused_with_the_reason(tmp_path, body, match):
    p = tmp_path / "r.toml"
    p.write_text(body)
    with pytest.raises(UsageError, match=match):
        Recipe.load(p)


def test_precedence_argument_recipe_metadata_default(trained, digits):
    one = {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}], "max_accuracy_drop": 0.25}
    m = copy.deepcopy(trained["mlp"])
    _, s = pipeline(m, digits, one, max_accuracy_drop=3.0)
    assert s.budget_pt == 3.0  # the argument wins over the recipe
    _, s = pipeline(copy.deepcopy(trained["mlp"]), digits, one)
    assert s.budget_pt == 0.25  # then the recipe
    m = copy.deepcopy(trained["mlp"])
    set_meta(m, val_fraction=0.2)
    _, s = pipeline(m, digits, {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}]})
    assert s.budget_pt == 0.5 and s.validation["samples"] == round(0.2 * len(digits))  # metadata, default
    _, s = pipeline(m, digits, {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}], "val_fraction": 0.3})
    assert s.validation["samples"] == round(0.3 * len(digits))  # the recipe over the metadata


def test_given_validation_data_is_used_whole(trained, digits):
    tr, va = data_mod.split(digits, 0.25, seed=1)
    _, s = pipeline(
        copy.deepcopy(trained["mlp"]),
        tr,
        {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}]},
        val_data=va,
    )
    assert s.validation == {
        "samples": len(va),
        "source": "given",
        "data": "digits[val]",
        "errors_allowed": errors_allowed(len(va), 0.5, 1.0),
    }


def test_errors_allowed_is_what_the_judge_lets_through():
    """``errors_allowed``: the most samples a candidate may lose (none gained) that the budget test passes, checked
    against the Judge itself on made-up per-sample scores; and ``samples_for`` inverts it."""
    from compress.scoring import Judge, Scores

    for n, budget, z in [(100, 0.5, 1.0), (500, 0.5, 1.0), (1000, 0.5, 1.0), (1000, 0.5, 2.0), (300, 3.0, 1.0)]:
        judge = Judge(None, budget, z)
        judge.ref = Scores(torch.full((n,), 100.0, dtype=torch.float64))
        judge._scores = lambda errors, n=n: Scores(torch.tensor([0.0] * errors + [100.0] * (n - errors)))
        passing = [e for e in range(0, 20) if judge(e)["within_budget"]]
        k = errors_allowed(n, budget, z)
        assert passing == list(range(k + 1)), (n, budget, z, passing)
        m = samples_for(k + 1, budget, z)
        assert m is not None and m > n and errors_allowed(m, budget, z) >= k + 1 > errors_allowed(m - 1, budget, z)
    assert errors_allowed(500, 0.5, 1.0) == 1 and errors_allowed(1000, 0.5, 1.0) == 3


def test_too_few_validation_samples_for_the_budget_are_flagged(trained, digits):
    """A validation set on which the budget lets a candidate lose at most one sample is said, with what would do."""
    tr, va = data_mod.split(digits, 0.1, seed=0)
    one = {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}]}
    for budget, flagged in [(0.5, True), (5.0, False)]:
        events = []
        _, s = pipeline(
            copy.deepcopy(trained["mlp"]),
            tr,
            one,
            max_accuracy_drop=budget,
            val_data=va,
            latency=False,
            on_event=lambda k, kw, events=events: events.append((k, kw)),
        )
        said = [kw["text"] for k, kw in events if k == "warning" and "validation samples are few" in kw["text"]]
        assert bool(said) == flagged and s.validation["errors_allowed"] == errors_allowed(len(va), budget, 1.0)
        if flagged:
            assert f"{samples_for(3, budget, 1.0):,} samples would allow 3" in said[0]


def test_a_model_trained_on_its_validation_split_is_flagged(digits):
    """A model that has learned every sample reads ~100% on the held-out split: say so, ask for --val-data."""
    torch.manual_seed(0)
    m = create_model("lenet300", input_size=8)
    fit(m, digits, FineTune(epochs=25, lr=3e-3))  # all of it, validation split included
    events = []
    pipeline(
        m,
        digits,
        {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}]},
        on_event=lambda k, kw: events.append((k, kw)),
    )
    warnings = [kw["text"] for k, kw in events if k == "warning"]
    assert warnings and "--val-data" in warnings[0]


def test_search_goes_on_past_noise_and_stops_on_evidence():
    """An inconclusive reading (over the budget by its noise margin only) neither ends nor resets the
    search; `patience` readings in a row whose measured drop alone is over do."""
    from compress.checkpoint import Stop as _Stop
    from compress.method import Context
    from compress.prune import sparsity_of
    from compress.search import _search

    stage = Recipe.from_dict(
        {"stage": [{"method": "threshold", "sparsity": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "finetune": {"epochs": 0}}]}
    ).stages[0]
    # (within budget, measured drop alone over budget) per candidate
    readings = iter([(True, False), (False, False), (True, False), (False, True), (False, True), (True, False)])

    def judge(model):
        ok, over = next(readings)
        return {
            "accuracy": 90.0,
            "drop": 0.0,
            "se": 0.1,
            "within_budget": ok,
            "over": over,
            "verdict": "",
            "why": "a reason",
        }

    torch.manual_seed(0)
    kept, _, res = _search(
        stage, create_model("lenet300", input_size=8), Context(), judge, lambda kind, **f: None, _Stop()
    )
    assert [t["value"] for t in res["tried"]] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert res["kept"]["value"] == 0.7 and res["kept"]["verdict"] == "kept: a reason"
    assert abs(sparsity_of(kept) - 0.7) < 0.01


def test_history_keeps_only_what_differs_from_the_defaults():
    from compress.config import Config

    for cfg in [c for s in DEFAULT_RECIPE.stages for c in s.candidates]:
        small = cfg.changes()
        assert Config.from_dict(small) == cfg
        assert len(str(small)) < len(str(cfg.to_dict())) / 2


def test_pipeline_command_reports_every_candidate_and_bytes_per_layer(trained, tmp_path, cli):
    import json

    _save_mlp(trained, tmp_path / "m.pt")
    res = cli(
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "digits",
        "--recipe",
        DEMO,
        "-o",
        tmp_path / "m.cpz",
        "--report",
        tmp_path / "rep",
    )
    assert res.code == 0, res.err
    assert "within budget" in res.err or "over budget" in res.err or "inconclusive" in res.err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "bytes in the .cpz" in md and "Every candidate" in md
    summary = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert summary["cpz_bytes"] == (tmp_path / "m.cpz").stat().st_size
    assert set(summary["layer_bytes"]) == {"fc1", "fc2", "fc3"}  # the tensor sections, without the manifest
    assert 0 < sum(summary["layer_bytes"].values()) < summary["cpz_bytes"]


def _ctrl_c_in_the_second_candidate(real):
    """``real`` (the pipeline's ``run``), but Ctrl-C pressed during its second call."""
    calls = []

    def interrupted_on_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    interrupted_on_the_second.calls = calls  # type: ignore[attr-defined]
    return interrupted_on_the_second


def test_ctrl_c_keeps_the_best_result_so_far(trained, digits, monkeypatch):
    """Ctrl-C during a candidate (the issue: exit 130, no message, a within-budget result lost): the
    candidate in progress is dropped, the stages after it do not run, and what was kept is the result,
    encoded and measured as usual."""
    import compress.search as pl

    interrupted_on_the_second = _ctrl_c_in_the_second_candidate(pl.run)

    def interrupted_at_once(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "run", interrupted_at_once)  # before anything was kept: the input model, encoded
    m, summary = pipeline(copy.deepcopy(trained["mlp"]), digits, Recipe.load(DEMO), latency=False)
    assert summary.stopped == "interrupted" and summary.stages[0].kept is None
    assert summary.final_accuracy == summary.base_accuracy

    monkeypatch.setattr(pl, "run", interrupted_on_the_second)
    events = []
    m, summary = pipeline(
        copy.deepcopy(trained["mlp"]),
        digits,
        Recipe.load(DEMO),
        max_accuracy_drop=5.0,
        on_event=lambda k, kw: events.append(k),
        latency=False,
    )
    assert summary.stopped == "interrupted" and "stopped" in events and len(interrupted_on_the_second.calls) == 2
    first = summary.stages[0]
    assert len(first.tried) == 1 and first.kept is not None  # the first candidate, within a loose budget
    assert len(summary.stages) == 1  # the stages after it did not run
    blob, _ = encode_model(copy.deepcopy(m))
    assert len(blob) == summary.cpz_bytes < summary.dense_bytes


class FakeClock:
    """Seconds that pass only when a test says so (``pipeline.clock``): no assertion depends on the machine's speed."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_stop_check_ends_long_work_at_its_next_step_in_its_own_thread_only(digits):
    """``progress.stop_when``: a training step inside it raises ``Stopped`` (a KeyboardInterrupt, as Ctrl-C) once
    the check is true; outside it, or in another thread, the same work runs to its end."""
    import threading

    from compress import progress

    steps: list[int] = []

    def counted(outputs, targets):
        steps.append(1)
        return torch.nn.functional.cross_entropy(outputs, targets)

    def train():
        fit(create_model("lenet300", input_size=8), digits, FineTune(epochs=0.1, batch_size=64), loss=counted)

    train()
    whole, steps[:] = len(steps), []
    assert whole >= 3
    with progress.stop_when(lambda: len(steps) >= 2):
        with pytest.raises(progress.Stopped) as caught:
            train()
        assert isinstance(caught.value, KeyboardInterrupt) and len(steps) == 2
        steps[:] = []
        t = threading.Thread(target=train)
        t.start()
        t.join()
        assert len(steps) == whole  # the check is this thread's


def test_a_time_budget_ends_the_search_between_candidates_and_the_eta_stays_within_it(
    trained, tmp_path, cli, monkeypatch
):
    """Each candidate takes 40 (fake) seconds against a 100 s budget: the three threshold candidates run, the
    k-means stage does not start, the run exits 3 (stopped) with its result written, and no candidate's line
    promises more time than the budget has left (the pace alone said 80 s, then 40 s)."""
    import json

    import compress.search as pl

    clock, real = FakeClock(), pl.run
    monkeypatch.setattr(pl, "clock", clock)

    def slow(*a, **kw):
        done = real(*a, **kw)
        clock.now += 40.0
        return done

    monkeypatch.setattr(pl, "run", slow)
    _save_mlp(trained, tmp_path / "m.pt")
    res = cli(
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "digits",
        "--recipe",
        DEMO,
        "--time-budget",
        "100",
        "--max-accuracy-drop",
        "5",
        "-o",
        tmp_path / "m.cpz",
        "--json",
        tmp_path / "s.json",
        "--no-latency",
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert res.code == 3, res.err
    assert summary["stopped"] == "time budget" and "stopped early (--time-budget reached)" in res.out
    assert [len(s["tried"]) for s in summary["stages"]] == [3], res.err  # the k-means stage never started
    assert "threshold 1/3 " in res.err and "[40s, ~1m00s left at most (time budget)]" in res.err
    assert "[1m20s, ~20s left at most (time budget)]" in res.err and "[2m00s]" in res.err
    assert (tmp_path / "m.cpz").stat().st_size == summary["cpz_bytes"] < summary["dense_bytes"]


def test_a_time_budget_drops_the_candidate_in_progress(trained, digits, monkeypatch):
    """The budget runs out half way through the second candidate's fine-tuning (each step takes one fake second):
    that candidate stops at its next step, as on Ctrl-C, and is dropped; the first one is the result."""
    import compress.search as pl
    from compress.train import cross_entropy

    clock = FakeClock()
    monkeypatch.setattr(pl, "clock", clock)
    started: list[float] = []  # when each training step began

    def slow_loss(outputs, targets):
        started.append(clock.now)
        clock.now += 1.0
        return cross_entropy(outputs, targets)

    recipe = {
        "stage": [
            {
                "method": "threshold",
                "sparsity": [0.5, 0.6, 0.7],
                "rounds": 1,
                "allocate": "std",
                "finetune": {"epochs": 0.5},
            }
        ]
    }
    ends: list[float] = []

    def note(kind, kw):
        if kind == "candidate":
            ends.append(clock.now)

    def go(**kw):
        return pipeline(
            copy.deepcopy(trained["mlp"]), digits, recipe, max_accuracy_drop=5.0, loss=slow_loss, latency=False, **kw
        )

    go(on_event=note)  # no budget: each candidate's steps, on the fake clock
    assert len(ends) == 3 and ends[0] >= 4 and ends[1] - ends[0] >= 4
    deadline = ends[0] + (ends[1] - ends[0]) // 2
    clock.now, started[:] = 0.0, []
    events = []
    _, summary = go(time_budget=deadline, on_event=lambda k, kw: events.append(k))
    assert summary.stopped == "time budget" and "stopped" in events
    stage = summary.stages[0]
    assert [t.value for t in stage.tried] == [0.5] and stage.kept.value == 0.5
    assert max(started) <= deadline < clock.now < ends[1]  # no step began after the deadline; the rest never ran
    assert not summary.kept_nothing


def test_the_eta_never_exceeds_the_time_budget_left(trained, digits, monkeypatch):
    """Every candidate's ``eta`` is at most what the time budget has left then; without a budget it is the pace
    so far times the candidates to come."""
    import compress.search as pl

    clock, real = FakeClock(), pl.run
    monkeypatch.setattr(pl, "clock", clock)
    monkeypatch.setattr(pl, "run", lambda *a, **kw: (setattr(clock, "now", clock.now + 30.0), real(*a, **kw))[1])
    recipe = {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": [8, 6, 5, 4]}]}

    def etas(**kw):
        seen = []
        clock.now = 0.0
        pipeline(
            copy.deepcopy(trained["mlp"]),
            digits,
            recipe,
            max_accuracy_drop=50.0,
            latency=False,
            on_event=lambda k, f: seen.append((clock.now, f)) if k == "candidate" else None,
            **kw,
        )
        return seen

    free = etas()
    assert [f["eta"] for _, f in free] == [90.0, 60.0, 30.0, None]  # 30 s a candidate, those to come
    assert all(f["budget_left"] is None for _, f in free)
    capped = etas(time_budget=100)
    assert len(capped) == 4
    for now, f in capped:
        assert f["budget_left"] == max(0.0, 100 - now)
        assert f["eta"] is None or f["eta"] <= f["budget_left"]
    assert [f["eta"] for _, f in capped] == [70.0, 40.0, 10.0, None]


def test_a_run_that_keeps_nothing_writes_nothing_and_says_what_to_try(trained, tmp_path, cli):
    """Every candidate over budget (the issue: a .cpz larger than the input, exit 0): no file, exit 4, and
    the message says so and what to try."""
    import json

    _save_mlp(trained, tmp_path / "m.pt")
    (tmp_path / "harsh.toml").write_text(
        "[[stage]]\nmethod = 'threshold'\nsparsity = [0.98, 0.99]\nrounds = 1\n"
        "allocate = 'std'\nfinetune = { epochs = 0 }\n"
    )
    res = cli(
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "digits",
        "--recipe",
        tmp_path / "harsh.toml",
        "--max-accuracy-drop",
        "0.5",
        "-o",
        tmp_path / "m.cpz",
        "--json",
        tmp_path / "s.json",
        "--no-latency",
    )
    assert res.code == 4, res.err
    assert not (tmp_path / "m.cpz").exists() and not (tmp_path / "m.cpz.resume").exists()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["kept_nothing"] and summary["stopped"] is None
    said = " ".join(res.err.split())
    assert "nothing kept: all 2 candidate(s) were over the 0.5 pt budget" in said and "was not written" in said
    assert "--sensitivity" in said and "a larger --max-accuracy-drop" in said and "gentle.toml" in said
    assert "nothing kept" in res.out and "smaller" not in res.out


def test_a_stopped_run_exits_3_with_what_it_kept(trained, tmp_path, cli, monkeypatch):
    """Ctrl-C (or the time budget) is told apart from a finished run: exit 3, the best result kept so far written
    (none when nothing was kept yet), the checkpoint left for --resume."""
    import compress.search as pl

    _save_mlp(trained, tmp_path / "m.pt")
    args = [
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "digits",
        "--recipe",
        DEMO,
        "--max-accuracy-drop",
        "5",
        "--no-latency",
    ]
    interrupted_on_the_second = _ctrl_c_in_the_second_candidate(pl.run)

    monkeypatch.setattr(pl, "run", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    res = cli(*args, "-o", tmp_path / "a.cpz")
    assert res.code == 3 and not (tmp_path / "a.cpz").exists()  # stopped in the first candidate: nothing to write
    assert "nothing was kept yet, so no OUTPUT is written" in " ".join(res.out.split())
    assert "nothing to resume" in res.out and not (tmp_path / "a.cpz.resume").exists()
    monkeypatch.setattr(pl, "run", interrupted_on_the_second)
    res = cli(*args, "-o", tmp_path / "b.cpz")
    assert res.code == 3 and (tmp_path / "b.cpz").is_file() and (tmp_path / "b.cpz.resume").is_dir()
    assert "--resume goes on" in " ".join(res.out.split())


def test_confidence_is_an_argument_and_the_summary_says_how_sure(trained, digits, tmp_path, cli):

    _, loose = pipeline(copy.deepcopy(trained["mlp"]), digits, Recipe.load(DEMO), latency=False, confidence=0.0)
    _, strict = pipeline(copy.deepcopy(trained["mlp"]), digits, Recipe.load(DEMO), latency=False, confidence=3.0)
    assert loose.confidence == 0.0 and strict.confidence == 3.0
    assert strict.cpz_bytes >= loose.cpz_bytes  # a stricter promise keeps no smaller a result
    _save_mlp(trained, tmp_path / "m.pt")
    res = cli(
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "digits",
        "--recipe",
        DEMO,
        "--confidence",
        "2",
        "-o",
        tmp_path / "m.cpz",
        "--no-latency",
    )
    assert res.code == 0 and "98% one-sided confidence" in " ".join(res.out.split())


@pytest.mark.parametrize("stop_at", [2, 4])  # inside the threshold search; inside the k-means search
def test_resume_reaches_the_result_of_an_uninterrupted_run(trained, digits, tmp_path, monkeypatch, stop_at):
    """A run stopped at a candidate leaves a checkpoint (after each decided candidate); resumed, it tries only
    the candidates left and ends with the same model, bytes and numbers as a run never stopped."""
    import compress.search as pl

    recipe = Recipe.load(DEMO)
    whole_model, whole = pipeline(copy.deepcopy(trained["mlp"]), digits, recipe, max_accuracy_drop=3.0, latency=False)
    ckpt = pl.Checkpoint(tmp_path / "run.resume")
    calls, real = [], pl.run

    def stopped(*a, **kw):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(pl, "run", stopped)
    _, part = pipeline(
        copy.deepcopy(trained["mlp"]), digits, recipe, max_accuracy_drop=3.0, latency=False, checkpoint=ckpt
    )
    assert part.stopped == "interrupted" and ckpt.exists()
    monkeypatch.setattr(pl, "run", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    events = []
    model, resumed = pipeline(
        copy.deepcopy(trained["mlp"]),
        digits,
        recipe,
        max_accuracy_drop=3.0,
        latency=False,
        checkpoint=ckpt,
        resume=True,
        on_event=lambda k, kw: events.append((k, kw)),
    )
    total = sum(len(s.tried) for s in whole.stages)
    assert len(calls) == total + 1  # the stopped candidate is tried again, nothing before it
    assert ("resumed", {"stage": int(stop_at > 3), "candidates": (stop_at - 1) - 3 * (stop_at > 3)}) in events
    for k in ("cpz_bytes", "ratio", "final_accuracy", "timeline"):
        assert getattr(resumed, k) == getattr(whole, k), k
    assert [s.tried for s in resumed.stages] == [s.tried for s in whole.stages]
    for a, b in zip(model.state_dict().values(), whole_model.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match="other settings"):  # a checkpoint of another run is refused
        pipeline(
            copy.deepcopy(trained["mlp"]),
            digits,
            recipe,
            max_accuracy_drop=1.0,
            latency=False,
            checkpoint=ckpt,
            resume=True,
        )


def test_ctrl_c_then_resume_from_the_command_line(trained, tmp_path, cli):
    """A real SIGINT to `compress pipeline`: a valid .cpz of the best kept result and a checkpoint; `--resume`
    then writes the very bytes an uninterrupted run writes, and removes the checkpoint."""
    import json
    import signal
    import subprocess
    import sys

    from compress.model_io import load_model

    _save_mlp(trained, tmp_path / "m.pt")
    args = [
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "digits",
        "--recipe",
        DEMO,
        "--max-accuracy-drop",
        "5",
        "--no-latency",
    ]  # the first candidate is kept (drop + SE ~3.2 pt): the stopped run has a result
    assert cli(*args, "-o", tmp_path / "full.cpz").code == 0
    exe = Path(sys.executable).parent / "compress"
    p = subprocess.Popen(
        [str(exe), *map(str, args), "-o", str(tmp_path / "cut.cpz")],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in p.stderr:  # the first candidate is decided (and checkpointed): stop during the second
        if "threshold 1/3" in line:
            p.send_signal(signal.SIGINT)
            break
    assert "within budget" in line, line
    rest = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=120) == 3, rest  # stopped, with the best kept result written
    assert "stopped during threshold (Ctrl-C)" in rest
    load_model(tmp_path / "cut.cpz")  # a valid file of the best kept so far
    assert (tmp_path / "cut.cpz.resume" / "state.json").is_file()
    r = cli(*args, "-o", tmp_path / "cut.cpz")  # neither resumed nor forced: refused, nothing lost
    assert r.code != 0 and "--resume" in r.err
    r = cli(*args, "-o", tmp_path / "cut.cpz", "--resume", "--json", tmp_path / "s.json")
    assert r.code == 0 and "resuming at stage 1, candidate 2" in r.err, r.err
    assert (tmp_path / "cut.cpz").read_bytes() == (tmp_path / "full.cpz").read_bytes()
    assert (
        not (tmp_path / "cut.cpz.resume").exists() and json.loads((tmp_path / "s.json").read_text())["stopped"] is None
    )


def test_old_recipe_words_are_refused_naming_what_is_read():
    """``type =``, method ``kmeans`` and threshold ``steps`` were spellings before the first release: a recipe that
    uses them is an error that says what is read instead, never a different run."""
    for stage, said in (
        ({"type": "threshold", "sparsity": 0.9}, "a stage names its method (method = ...;"),
        ({"method": "kmeans", "bits": 5}, "unknown method 'kmeans'"),
        ({"method": "threshold", "sparsity": 0.9, "steps": 2}, "unknown option(s) steps"),
        ({"method": "int8", "bits": 8}, "unknown option(s) bits"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused, not read with a warning
            with pytest.raises(UsageError, match=re.escape(said)):
                Recipe.from_dict({"stage": [stage]})


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "docs/recipes").glob("*.toml")), ids=lambda p: p.name
)
def test_every_documented_recipe_reads(path):
    from compress.recipe import Recipe

    recipe = Recipe.load(path)
    assert recipe.stages and all(st.candidates for st in recipe.stages)


def test_compress_pipeline_is_the_function_after_any_import_order():
    """In fresh interpreters: importing the module that defines it first, or trying ``import compress.pipeline``
    (there is no such module), leaves ``compress.pipeline`` the function."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for code in (
        "import compress.search\nimport compress\nassert callable(compress.pipeline)\n",
        "import compress\ntry:\n    import compress.pipeline\nexcept ModuleNotFoundError:\n    pass\n"
        "assert callable(compress.pipeline), compress.pipeline\n",
        "from compress import pipeline\nimport compress.search\nimport compress\n"
        "assert compress.pipeline is pipeline and callable(pipeline)\n",
    ):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, (code, out.stderr)


def test_compress_pipeline_is_the_function_whatever_was_imported():
    """After `import compress.pipeline` it was the module ("'module' object is not callable"): the module is
    compress.search, and no submodule of compress is named like a function of its API."""
    import pkgutil

    import compress
    import compress.search

    assert callable(compress.pipeline) and compress.pipeline.__module__ == "compress.search"
    modules = {m.name for m in pkgutil.iter_modules(compress.__path__)}
    assert not modules & {n for n in compress.__all__ if n != "data"}, modules & set(compress.__all__)
