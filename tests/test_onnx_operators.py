"""The NumPy API against ONNX's normalization operators, for people porting models: each
operator as a one-node model, run by ONNX's reference implementation
(``onnx.reference.ReferenceEvaluator``), and the pattern, keywords and recipes the README
gives for it. Oracles: ONNX's reference implementation and hypothesis properties."""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normlab

onnx = pytest.importorskip("onnx")

README = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())


def _onnx(op, inputs, opset, **attributes):
    """Run one ONNX node on ``inputs`` (a dict of arrays) with ONNX's reference implementation."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    def info(name, array):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)

    graph = helper.make_graph([helper.make_node(op, list(inputs), ["Y"], **attributes)], op,
                              [info(name, array) for name, array in inputs.items()],
                              [helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(
                                  next(iter(inputs.values())).dtype), None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    with np.errstate(invalid="ignore", divide="ignore"):  # (LpNormalization divides an all-zero group, then masks it)
        return ReferenceEvaluator(model).run(None, inputs)[0]


def _readme_recipe(operator):
    """The keywords the README's sentence on ``operator`` gives first: ``{"p": "2", "rms": "True", ...}``."""
    sentence = re.search(rf"{operator} .*?(?:\. [A-Z]|$)", README)
    assert sentence, f"the README names no recipe for {operator}"
    keywords = {}
    for name, value in re.findall(r"(\w+)=([^,`\s]+)", sentence.group(0)):
        keywords.setdefault(name, value)
    return keywords


@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]), n=st.integers(1, 300),
       seed=st.integers(0, 2**16))
def test_the_readme_l2_recipe_gives_onnx_lp_normalization_at_any_magnitude(data, dtype, n, seed):
    # LpNormalization p=2 divides by the root of the sum of squares, with nothing added: a
    # recipe's eps must stay below the mean square of every group the input's dtype holds
    largest = {np.float32: 15, np.float64: 150}[dtype]  # (ONNX squares in the input's dtype: keep them finite)
    exponent = data.draw(st.integers(-largest, largest), label="exponent")
    x = (np.random.default_rng(seed).standard_normal((3, n)) * 10.0 ** exponent).astype(dtype)
    x[1] = 0.0  # an all-zero group: ONNX gives 0
    recipe = _readme_recipe("LpNormalization")
    assert recipe["p"] == "2" and recipe["rms"] == "True"
    weight = np.full(n, n ** -0.5, dtype)
    y = normlab.normalize(x, "a [b]", rms=True, eps=float(recipe["eps"]), weight=weight, params="b")
    expected = _onnx("LpNormalization", {"X": x}, 22, axis=-1, p=2)
    np.testing.assert_allclose(y, expected, rtol=4 * np.finfo(dtype).eps, atol=0)


def _told(call):
    with pytest.raises(normlab.errors.ShapeError) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize("op, opset, attributes, pattern", [
    ("LayerNormalization", 17, {"axis": 1}, "b c h [w]"),
    ("LayerNormalization", 17, {"axis": -2}, "b c h [w]"),
    ("RMSNormalization", 23, {"axis": 2}, "b c h [w]"),
    ("MeanVarianceNormalization", 13, {"axes": [0, 2, 3]}, "b c [h w]"),
    ("MeanVarianceNormalization", 13, {"axes": [1]}, "[b] c h w"),
])
def test_onnx_s_axis_and_axes_passed_as_keywords_are_answered_with_the_pattern_that_gives_onnx_s_result(
        op, opset, attributes, pattern):
    # a porting user passes the operator's attribute; it landed among the axis sizes and was
    # told "use one of b, c, h, w, or drop it", where dropping it keeps the wrong brackets
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    message = _told(lambda: normlab.normalize(x, pattern, **attributes))
    assert pattern in message and "(2, 3, 4, 5)" in message and "use one of" not in message
    written = re.search(r"pass the pattern '([^']+)'", message).group(1)
    keywords = {"eps": 1e-18} if op == "MeanVarianceNormalization" else {"rms": op == "RMSNormalization"}
    inputs = {"X": x} if op == "MeanVarianceNormalization" else {"X": x, "S": np.ones(x.shape[attributes["axis"]:])}
    expected = _onnx(op, {"X": x.astype(np.float32)} if op == "MeanVarianceNormalization" else inputs, opset,
                     **attributes)  # (ONNX's MeanVarianceNormalization runs in float32 only)
    np.testing.assert_allclose(normlab.normalize(x, written, **keywords), expected, rtol=1e-5, atol=1e-5)


def test_onnx_s_num_groups_passed_as_a_keyword_is_answered_with_the_group_factor_s_size():
    # it was told "use one of b, g, c, h, w, or drop it"
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 5))
    message = _told(lambda: normlab.normalize(x, "b (g [c]) [h w]", num_groups=3))
    assert "use one of" not in message and "drop it" not in message
    sizes = dict((name, int(size)) for name, size in re.findall(r"pass (\w+)=(\d+)", message))
    expected = _onnx("GroupNormalization", {"X": x, "S": np.ones(6), "B": np.zeros(6)}, 21, num_groups=3,
                     stash_type=11)
    np.testing.assert_allclose(normlab.normalize(x, "b (g [c]) [h w]", **sizes), expected, rtol=1e-9, atol=1e-12)
    assert "write the channels as (g [c]) and pass g=3" in _told(lambda: normlab.normalize(x, "b c [h w]",
                                                                                         num_groups=3))


def test_the_torch_norm_answers_onnx_s_attributes_as_the_numpy_api_does():
    nt = pytest.importorskip("normlab.torch")
    assert "pass the pattern 'b [c h w]'" in _told(lambda: nt.Norm("b c h [w]", axis=1))
    assert "pass g=4" in _told(lambda: nt.Norm("b (g [c]) [h w]", num_groups=4))


@pytest.mark.parametrize("opset, given_params", [(18, "(g c)"), (21, "g"), (21, None)])
def test_a_group_norm_scale_of_the_other_opset_is_answered_with_the_params_that_give_onnx_s_result(opset, given_params):
    # GroupNormalization-18 takes a scale and bias per group, 21 per channel; each under the
    # other's params was told "pass a weight of shape (6,) or change params", without the params
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 4, 5))
    scale, bias = rng.standard_normal((2, 3 if opset == 18 else 6))
    with pytest.raises(normlab.errors.ParamsError) as caught:
        normlab.normalize(x, "b (g [c]) [h w]", g=3, weight=scale, bias=bias, params=given_params)
    message = str(caught.value)
    assert "(2, 6, 4, 5)" in message and "b (g [c]) [h w]" in message
    params = re.search(r"(?:spans,|e\.g\.) params='([^']+)'$", message).group(1)
    expected = _onnx("GroupNormalization", {"X": x, "S": scale, "B": bias}, opset, num_groups=3,
                     **({"stash_type": 11} if opset == 21 else {}))
    np.testing.assert_allclose(normlab.normalize(x, "b (g [c]) [h w]", g=3, weight=scale, bias=bias, params=params),
                               expected, rtol=1e-9, atol=1e-12)
