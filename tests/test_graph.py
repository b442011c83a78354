"""A .cpz of the user's own classes also holds its torch.export graph: it decodes and runs where
their code is not, and a forged graph is refused before torch sees it (torch's own loader unpickles,
compiles guard code and eval()s sympy strings)."""
import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.coding.container import decode_model, encode_model
from compress.errors import InputError
from compress.meta import set_meta
from compress.quantize import QuantConfig, quantize
from tests.archs import ConvNeXt, convnext_mini
from tests.test_hostile import forge, unpack

SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def user_model():
    m = convnext_mini().eval()
    quantize(m, QuantConfig(bits=4, scheme="kmeans"))
    set_meta(m, input_shape=list(SHAPE))
    blob, stats = encode_model(copy.deepcopy(m), graph=True)
    return m, blob, stats


def test_a_model_of_user_classes_decodes_and_runs_without_its_code(user_model):
    m, blob, stats = user_model
    plain, _ = encode_model(copy.deepcopy(m))
    assert 0 < stats["graph_bytes"] < 8000 and len(blob) - len(plain) < 8000  # a few KB of graph
    d = decode_model(blob)  # no --arch: the graph
    assert not isinstance(d, ConvNeXt) and d.compress_meta["input_shape"] == list(SHAPE)
    for batch in (1, 5):  # the batch dimension is free
        x = torch.randn(batch, *SHAPE[1:])
        assert torch.equal(d(x), m(x))
    again = decode_model(encode_model(d)[0])  # a decoded graph encodes again: weights coded as before
    x = torch.randn(2, *SHAPE[1:])
    assert torch.equal(again(x), m(x)) and len(encode_model(d)[0]) <= len(blob)
    assert isinstance(decode_model(blob, base=convnext_mini), ConvNeXt)  # with --arch: the user's classes


def test_a_graph_decoded_model_is_not_changed_or_exported_and_says_how_to(user_model, tmp_path):
    from compress.errors import UsageError
    from compress.export import to_onnx
    from compress.prune import L1FilterConfig
    from compress.stages import Context, run

    d = decode_model(user_model[1])
    for verb, cfg in (("prune", L1FilterConfig(ratio=0.5)), ("quantize", QuantConfig(bits=8))):
        with pytest.raises(UsageError, match="--arch"):
            run(verb, d, cfg, Context(input_shape=SHAPE))
    with pytest.raises(UsageError, match="stored torch.export graph"):
        to_onnx(d, tmp_path / "m.onnx", SHAPE)


def test_attention_decodes_from_its_graph():
    """MultiheadAttention (a transformer encoder layer) through torch.export and back."""
    from tests.archs import tiny_vit

    m = tiny_vit()
    set_meta(m, input_shape=[1, 3, 32, 32])
    blob, stats = encode_model(copy.deepcopy(m), graph=True)
    assert stats["graph_bytes"] > 0
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(decode_model(blob)(x), m(x))


def test_without_an_input_shape_there_is_no_graph_and_the_note_says_why():
    _, stats = encode_model(convnext_mini(), graph=True)
    assert stats["graph_bytes"] == 0 and "input shape" in stats["graph_note"]
    with pytest.raises(InputError, match="--arch"):
        decode_model(encode_model(convnext_mini(), graph=True)[0])


def _nodes(g):
    return g["graph_module"]["graph"]["nodes"]


def _first_expr(g):
    for tv in g["graph_module"]["graph"]["tensor_values"].values():
        for s in tv["sizes"]:
            if "as_expr" in s:
                return s["as_expr"]
    raise AssertionError("no symbolic size")


FORGERIES = {
    "an operator that reads files": (lambda g: _nodes(g)[0].update(target="torch.ops.aten.from_file.default"),
                                     "allow-list"),
    "any torch callable": (lambda g: _nodes(g)[0].update(target="torch.load"), "allow-list"),
    "a builtin": (lambda g: _nodes(g)[0].update(target="builtins.eval"), "allow-list"),
    "guard code": (lambda g: g.update(guards_code=["__import__('os').system('touch {canary}')"]), "guard code"),
    "a sympy string": (lambda g: _first_expr(g).update(expr_str="__import__('os').system('touch {canary}')"),
                       "plain integer expression"),
    "a power tower": (lambda g: _first_expr(g).update(expr_str="Integer(9)**Integer(9)**Integer(99)"),
                      "plain integer expression"),
    "a name that is code": (lambda g: _nodes(g)[0]["outputs"][0]["as_tensor"].update(
        name="x = __import__('os').system('touch {canary}')"), "not an identifier"),
    "a custom object": (lambda g: _nodes(g)[0]["inputs"][0].update(arg={"as_custom_obj": {"name": "o"}}),
                        "custom_obj"),
    "an input of no kind": (lambda g: g["graph_module"]["signature"]["input_specs"].insert(0, {}), "input of kind"),
    "a lifted constant": (lambda g: g["graph_module"]["signature"]["input_specs"].insert(
        0, {"constant_tensor": {"arg": {"name": "c"}, "tensor_constant_name": "c"}}), "input of kind"),
    "a signature of the wrong type": (lambda g: g["graph_module"].update(signature=["not", "a", "table"]),
                                      "malformed"),
    "a node of the wrong type": (lambda g: _nodes(g).append(7), "allow-list"),
    "a tensor the file lacks": (lambda g: g["graph_module"]["signature"]["input_specs"][0]["parameter"].update(
        parameter_name="nowhere.weight"), "does not hold"),
}


@pytest.mark.parametrize("what", list(FORGERIES))
def test_a_forged_graph_is_refused_before_anything_runs(user_model, what, tmp_path):
    manifest, sections = unpack(user_model[1])
    canary = tmp_path / "canary"
    change, match = FORGERIES[what]
    graph = json.loads(json.dumps(manifest["graph"]).replace("{canary}", str(canary)))
    change(graph)
    manifest["graph"] = json.loads(json.dumps(graph).replace("{canary}", str(canary)))
    with pytest.raises(InputError, match=match):
        decode_model(forge(manifest, sections))
    assert not canary.exists()


@pytest.fixture(scope="module")
def small_graph_cpz():
    from tests.archs import tiny_cnn

    m = tiny_cnn()
    set_meta(m, input_shape=[1, 1, 8, 8])
    return unpack(encode_model(m, graph=True)[0])


def _leaves(v, path=()):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _leaves(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _leaves(x, path + (i,))
    else:
        yield path


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.text(max_size=30),
                  st.sampled_from(["torch.load", "os.system", "torch.ops.aten.from_file.default", "__import__",
                                   "Symbol('s1')**Integer(99)", "x;y", "builtins.exec"]),
                  st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                             max_size=2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_graph_is_refused_in_one_line_or_runs(small_graph_cpz, data):
    """Any value anywhere in the graph replaced by junk: decoding raises compress's own errors (one
    line in the CLI), or gives a model; never another exception."""
    from compress.errors import FormatError

    manifest, sections = small_graph_cpz
    m = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_leaves(m["graph"]))))
        target = m["graph"]
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = data.draw(_JUNK)
    try:
        decode_model(forge(m, sections))
    except (InputError, FormatError):
        pass
