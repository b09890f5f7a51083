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
