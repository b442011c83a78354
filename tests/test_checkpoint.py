"""The checkpoint folder (``compress pipeline ... --resume``, ``OUTPUT.resume``) read as an attacker writes it.

A real checkpoint is made once (a run stopped after its first candidate); each case copies it and tampers
with it. The command-line cases run in a child process under a memory cap and a timeout
(``tests/hostile_harness.py``) and always pass ``--trust-pickle``: the user's trust in their model must
never reach a file in the folder. Cases that the library refuses before loading anything run in-process.
"""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress.search as pl
from compress.checkpoint import MANIFEST, MAX_STATE_BYTES, STATE, Checkpoint, check_state
from compress.cli import main
from compress.errors import InputError
from compress.meta import set_meta
from compress.model_io import save_model
from compress.models import create_model
from compress.recipe import Recipe
from tests.hostile_harness import run_cli

RECIPE = """version = 2
[[stage]]
method = "threshold"
sparsity = [0.5, 0.8]
rounds = 1
finetune = { epochs = 0.1 }
"""


def _args(root: Path, *extra, resume=True) -> list[str]:
    """`compress pipeline` of the model in ``root``, trusting it (--trust-pickle), to ``root/m.cpz``."""
    return [
        str(a)
        for a in [
            "pipeline",
            root / "m.pt",
            "--train-data",
            "digits",
            "--recipe",
            root / "r.toml",
            "--max-accuracy-drop",
            "50",
            "--no-latency",
            "--trust-pickle",
            "-o",
            root / "m.cpz",
            *(["--resume"] if resume else []),
            *extra,
        ]
    ]


class Case:
    """One copy of the made checkpoint in ``root``: ``m.cpz.resume`` beside the model ``m.pt``."""

    def __init__(self, made: Path, root: Path):
        self.root, self.made = root, made
        shutil.copy(made / "m.pt", root / "m.pt")
        shutil.copy(made / "r.toml", root / "r.toml")
        self.folder = root / "m.cpz.resume"
        shutil.copytree(made / "m.cpz.resume", self.folder)
        self.state = json.loads((self.folder / STATE).read_text())

    def args(self, *extra, resume=True):
        return _args(self.root, *extra, resume=resume)

    def save(self, doc=None, raw: bytes | None = None):
        (self.folder / STATE).write_bytes(raw if raw is not None else json.dumps(doc).encode())

    def read(self):
        """What the library makes of the folder on --resume (the run's own fingerprint and recipe)."""
        plan = pl._plan(Recipe.load(self.root / "r.toml"))
        return Checkpoint(self.folder).read(
            json.loads((self.made / "m.cpz.resume" / STATE).read_text())["fingerprint"], plan
        )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real checkpoint: an untrained LeNet-300 (every candidate is within a 50-point budget) stopped by
    Ctrl-C during its second candidate."""
    root = tmp_path_factory.mktemp("made")
    torch.manual_seed(0)
    m = create_model("lenet300", input_size=8)
    set_meta(m, input_shape=[1, 1, 8, 8])
    save_model(m, root / "m.pt")
    (root / "r.toml").write_text(RECIPE)
    calls, real = [], pl.run

    def stopped(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pl, "run", stopped)
        assert main(_args(root, resume=False)) == 3  # stopped, its first candidate written
    assert (root / "m.cpz.resume" / MANIFEST).is_file()
    return root


@pytest.fixture
def case(made, tmp_path):
    return Case(made, tmp_path)


def _payload(sentinel: Path):
    """A torch file whose unpickling creates ``sentinel``: proof that code from the file ran."""

    class Payload:
        def __reduce__(self):
            return open, (str(sentinel), "w")

    return {"state_dict": Payload()}


def _refused(res, *words):
    assert res.one_line_refusal, res
    for w in words:
        assert w in res.err, res
    print(f"{res.peak_mb:.0f} MB, {res.seconds:.1f} s")


# ------------------------------------------------------------------ the made checkpoint itself
def test_the_made_checkpoint_is_compress_own(case):
    state, models = case.read()
    assert set(models) == {"model", "snapshot0", "kept", "current"} and state["search"]["next"] == 1
    listed = json.loads((case.folder / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in case.folder.iterdir() if p.name != MANIFEST)


# ------------------------------------------------------------------ names from state.json
@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../../model-1.pt",
        "../m.pt",
        "model-1.pt/..",
        "model-１.pt",
        "model-01.pt",
        "model-1.pt\n",
        "kept-1.pt",
        "model-1.PT",
        "model-1",
        "",
        7,
        None,
    ],
)
def test_a_model_name_that_is_not_a_plain_name_of_compress_pattern_is_refused(case, name):
    case.state["models"]["model"] = name
    case.save(case.state)
    with pytest.raises(InputError, match="models.model"):
        case.read()


def test_an_absolute_name_is_refused_by_the_command_even_with_trust(case):
    case.state["models"]["model"] = str(case.root / "m.pt")
    case.save(case.state)
    _refused(run_cli(*case.args()), "models.model", "not a name compress writes")


def test_names_of_two_writes_and_names_outside_the_manifest_are_refused(case):
    doc = copy.deepcopy(case.state)
    doc["models"]["snapshot0"] = "snapshot0-99.pt"
    case.save(doc)
    with pytest.raises(InputError, match="more than one write"):
        case.read()
    case.save(case.state)
    manifest = json.loads((case.folder / MANIFEST).read_text())
    manifest["files"].remove(case.state["models"]["current"])  # present, well named, but not listed
    (case.folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="manifest"):
        case.read()


def test_a_linked_model_file_is_refused(case):
    name = case.state["models"]["model"]
    (case.folder / name).unlink()
    (case.folder / name).symlink_to(case.root / "m.pt")  # a real model: only the link is wrong
    with pytest.raises(InputError, match="not a regular file"):
        case.read()


def test_a_pickle_in_the_folder_never_runs_even_with_trust_pickle(case):
    """The user trusts their model (--trust-pickle); a payload put in place of a checkpoint model file that
    state.json names is compress's own data, loaded without trust: refused, and it never ran."""
    sentinel = case.root / "ran"
    torch.save(_payload(sentinel), case.folder / case.state["models"]["model"])
    _refused(run_cli(*case.args()), "would run code")
    assert not sentinel.exists()


# ------------------------------------------------------------------ state.json out of shape
def _drop(key):
    return lambda d: d.pop(key)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_drop("timeline"), "missing 'timeline'"),
        (_drop("models"), "missing 'models'"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d.update(stage="0"), "stage"),
        (lambda d: d.update(stage=True), "stage"),
        (lambda d: d.update(stage=10**300), "stage"),
        (lambda d: d.update(stage=-1), "stage"),
        (lambda d: d.update(stage=1), "results"),  # past the stage the records reach
        (lambda d: d.update(timeline=[]), "timeline"),
        (lambda d: d["timeline"][0].update(bytes=10**30), "bytes"),
        (lambda d: d["timeline"][0].update(accuracy=1e308), "accuracy"),
        (lambda d: d["timeline"][0].update(stage="\x1b[2Jdense fp32"), "timeline"),
        (lambda d: d["timeline"][0].update(test_accuracy=1.0), "--test-data"),
        (lambda d: d.update(measured=[{}, 1.0]), "measured"),
        (lambda d: d.update(search="junk"), "search"),
        (lambda d: d["search"].update(next=5), "search.next"),
        (lambda d: d["search"].update(next="１"), "search.next"),
        (lambda d: d["search"].update(misses=-3), "search.misses"),
        (lambda d: d["search"].update(kept_index=9), "search.kept_index"),
        (lambda d: d["search"].update(kept_index=None), "kept_sizes"),
        (lambda d: d["search"]["tried"][0].update(options={"type": "ThresholdConfig"}), "candidate 1"),
        (lambda d: d["search"]["tried"][0].update(value=True), "candidate 1"),
        (lambda d: d["search"]["tried"][0].update(bytes=-1), "bytes"),
        (lambda d: d["search"]["tried"][0].update(verdict=["x"] * 3), "verdict"),
        (lambda d: d["search"]["tried"][0].pop("why"), "why"),
        (lambda d: d["search"]["kept_sizes"].update(layers={"fc1": 10**20}), "layers"),
        (lambda d: d["search"].update(tried=d["search"]["tried"] * 1000), "tried"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_state_out_of_shape_is_refused_in_one_line(case, edit, match):
    doc = copy.deepcopy(case.state)
    edit(doc)
    case.save(doc)
    with pytest.raises(InputError, match=match) as e:
        case.read()
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_deeply_nested_state_is_refused(case):
    case.save(raw=b'{"stage": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")  # deeper than the parser goes
    with pytest.raises(InputError, match="not JSON"):
        case.read()


def test_a_huge_state_is_refused_by_the_command_by_its_size(case):
    case.save(raw=b" " * (MAX_STATE_BYTES + 1))  # never read
    _refused(run_cli(*case.args()), "bytes, over the")


def test_a_state_of_many_small_objects_within_the_size_limit_costs_little(case):
    """The most objects the size limit lets through: refused by its first field, memory bounded."""
    body = b"[" + b"[]," * ((MAX_STATE_BYTES - 200) // 3) + b"[]]"
    case.save(raw=b'{"stage": ' + body + b', "fingerprint": "' + case.state["fingerprint"].encode() + b'"}')
    res = run_cli(*case.args())
    _refused(res, "state")
    assert res.peak_mb < 1000


# ------------------------------------------------------------------ the folder itself
def test_a_linked_folder_is_refused_and_its_target_untouched(case, tmp_path):
    """OUTPUT.resume a link to another folder -- even one that looks like a checkpoint: neither a fresh run
    (with --force) nor --resume reads, writes or deletes there."""
    other = tmp_path / "other"
    case.folder.rename(other)
    (other / "mine.pt").write_bytes(b"user's")
    case.folder.symlink_to(other)
    before = sorted((p.name, p.read_bytes()) for p in other.iterdir())
    _refused(run_cli(*case.args("--force", resume=False)), "symbolic link")
    with pytest.raises(InputError, match="symbolic link"):
        case.read()
    assert sorted((p.name, p.read_bytes()) for p in other.iterdir()) == before and case.folder.is_symlink()


def test_a_foreign_folder_survives_a_fresh_run_with_force(case):
    """A folder of the user's own named like a checkpoint (no manifest): never written, cleared or read."""
    shutil.rmtree(case.folder)
    case.folder.mkdir()
    (case.folder / "model-1.pt").write_bytes(b"user's")
    (case.folder / STATE).write_text("{}")
    _refused(run_cli(*case.args("--force", resume=False)), "not made by compress")
    with pytest.raises(InputError, match="not made by compress"):
        case.read()
    with pytest.raises(InputError, match="not made by compress"):
        Checkpoint(case.folder).write({}, {})
    assert sorted(p.name for p in case.folder.iterdir()) == ["model-1.pt", STATE]


def test_a_finished_run_deletes_only_what_its_manifest_lists(case):
    """Files put in the folder beside compress's (a note, a pickle that would run): the resumed run does not
    load them, finishes, deletes its own files and manifest, and leaves the folder with theirs."""
    sentinel = case.root / "ran"
    (case.folder / "notes.txt").write_text("mine")
    torch.save(_payload(sentinel), case.folder / "current-9.pt")  # well named, but unlisted and unnamed
    res = run_cli(*case.args())
    assert res.code == 0, res
    print(f"finished: {res.peak_mb:.0f} MB, {res.seconds:.1f} s")
    assert sorted(p.name for p in case.folder.iterdir()) == ["current-9.pt", "notes.txt"]
    assert not sentinel.exists() and (case.root / "m.cpz").is_file()


def test_remove_leaves_an_emptied_folder_gone_and_a_link_named_by_the_manifest_is_only_unlinked(case, tmp_path):
    target = tmp_path / "precious.pt"
    target.write_bytes(b"user's")
    name = case.state["models"]["model"]
    (case.folder / name).unlink()
    (case.folder / name).symlink_to(target)
    Checkpoint(case.folder).remove()
    assert not case.folder.exists() and target.read_bytes() == b"user's"


# ------------------------------------------------------------------ property: the checker raises only InputError
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
    max_leaves=25,
)


def _paths(v, at=()):
    yield at
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, at + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, at + (i,))


@pytest.fixture(scope="module")
def real(made):
    return (json.loads((made / "m.cpz.resume" / STATE).read_text()), pl._plan(Recipe.load(made / "r.toml")))


def _checked(doc, plan, test=False):
    try:
        check_state(doc, plan, test)
    except InputError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_json, test=st.booleans())
def test_any_json_document_gets_at_most_an_input_error(real, doc, test):
    _checked(doc, real[1], test)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_real_state_with_one_field_changed_gets_at_most_an_input_error(real, data):
    doc, plan = copy.deepcopy(real[0]), real[1]
    check_state(copy.deepcopy(doc), plan)  # the unchanged one is accepted
    at = data.draw(st.sampled_from(list(_paths(doc))[1:]))
    parent = doc
    for k in at[:-1]:
        parent = parent[k]
    how = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if how == "drop":
        del parent[at[-1]]
    elif how == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(_json)
    else:
        parent[at[-1]] = data.draw(_json)
    _checked(doc, plan, data.draw(st.booleans()))
