"""The NumPy API against ONNX's normalization operators, for people porting models: each
operator as a one-node model, run by ONNX's reference implementation
(``onnx.reference.ReferenceEvaluator``), and the pattern, keywords and recipes the README
gives for it. Oracles: ONNX's reference implementation and hypothesis properties."""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import normlab
from tests.prerequisites import normlab_torch_or_skip

onnx = pytest.importorskip("onnx")

README = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())


def _onnx(op, inputs, opset, outputs=("Y",), **attributes):
    """Run one ONNX node on ``inputs`` (a dict of arrays) with ONNX's reference implementation:
    its output ``Y``, or the list of ``outputs``."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    def info(name, array):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)

    dtype = helper.np_dtype_to_tensor_dtype(next(iter(inputs.values())).dtype)
    graph = helper.make_graph([helper.make_node(op, list(inputs), list(outputs), **attributes)], op,
                              [info(name, array) for name, array in inputs.items()],
                              [helper.make_tensor_value_info(name, dtype, None) for name in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    with np.errstate(invalid="ignore", divide="ignore"):  # (LpNormalization divides an all-zero group, then masks it)
        results = ReferenceEvaluator(model).run(None, inputs)
    return results[0] if outputs == ("Y",) else results


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


# each operator is run by ONNX on the float64 copy of the inputs, so the tolerance is normlab's
# own rounding to the input's dtype: a float16 result is rounded once from float64
_TOLERANCE = {np.float16: 1e-3, np.float32: 1e-5, np.float64: 1e-8}
_DTYPES = st.sampled_from([np.float16, np.float32, np.float64])
_EPS = st.sampled_from([1e-5, 1e-2, 0.5]).map(lambda eps: float(np.float32(eps)))  # ONNX's attributes are float32


def _close(actual, expected, dtype):
    tolerance = _TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tolerance, atol=tolerance)


def _draw_input(data, shape, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = rng.standard_normal(shape) * data.draw(st.sampled_from([1.0, 8.0]), label="scale")
    return x.astype(dtype), rng


@given(data=st.data(), shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), dtype=_DTYPES,
       eps=_EPS, with_bias=st.booleans())
def test_layer_and_rms_normalization_at_any_axis_are_the_pattern_that_brackets_the_axes_from_it_on(
        data, shape, dtype, eps, with_bias):
    x, rng = _draw_input(data, shape, dtype)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    names = [f"a{i}" for i in range(len(shape))]
    start = axis % len(shape)
    pattern, params = " ".join(names[:start] + ["[" + " ".join(names[start:]) + "]"]), " ".join(names[start:])
    scale, bias = rng.standard_normal((2, *shape[start:])).astype(dtype)
    inputs = {"X": x.astype(np.float64), "S": scale.astype(np.float64)}
    if with_bias:
        inputs["B"] = bias.astype(np.float64)
    y, mean, rstd = normlab.normalize(x, pattern, weight=scale, bias=bias if with_bias else None, params=params,
                                      eps=eps, return_stats=True)
    expected_y, expected_mean, expected_rstd = _onnx("LayerNormalization", inputs, 17, ["Y", "Mean", "InvStdDev"],
                                                     axis=axis, epsilon=eps)
    _close(y, expected_y, dtype)
    assert mean.shape == expected_mean.shape and rstd.shape == expected_rstd.shape
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-8, atol=1e-8)  # (float64 from any input)
    np.testing.assert_allclose(rstd, expected_rstd, rtol=1e-8)
    y = normlab.normalize(x, pattern, weight=scale, params=params, eps=eps, rms=True)
    _close(y, _onnx("RMSNormalization", {"X": inputs["X"], "S": inputs["S"]}, 23, axis=axis, epsilon=eps), dtype)


@given(data=st.data(), batch=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), max_size=3), dtype=_DTYPES, eps=_EPS)
def test_group_and_instance_normalization_are_the_group_and_instance_norm_patterns(
        data, batch, groups, per_group, spatial, dtype, eps):
    channels = groups * per_group
    x, rng = _draw_input(data, (batch, channels, *spatial), dtype)
    rest = " ".join(f"s{i}" for i in range(len(spatial)))
    pattern = f"b (g [c]) [{rest}]" if spatial else "b (g [c])"
    per_channel, per_group_scale = rng.standard_normal((2, channels)), rng.standard_normal((2, groups))
    for opset, (scale, bias), params in ((21, per_channel, "(g c)"), (18, per_group_scale, "g")):
        scale, bias = scale.astype(dtype), bias.astype(dtype)
        expected = _onnx("GroupNormalization", {"X": x.astype(np.float64), "S": scale.astype(np.float64),
                                                "B": bias.astype(np.float64)}, opset, num_groups=groups,
                         epsilon=eps, **({"stash_type": 11} if opset == 21 else {}))
        _close(normlab.normalize(x, pattern, g=groups, weight=scale, bias=bias, params=params, eps=eps), expected, dtype)
    if spatial:
        scale, bias = per_channel.astype(dtype)
        expected = _onnx("InstanceNormalization", {"X": x.astype(np.float64), "S": scale.astype(np.float64),
                                                   "B": bias.astype(np.float64)}, 22, epsilon=eps)
        _close(normlab.normalize(x, f"b c [{rest}]", weight=scale, bias=bias, params="c", eps=eps), expected, dtype)


@given(data=st.data(), batch=st.integers(2, 4), channels=st.integers(1, 4), spatial=st.lists(st.integers(1, 3), max_size=2),
       dtype=_DTYPES, eps=_EPS, opset=st.sampled_from([14, 15]))
def test_batch_normalization_in_inference_and_training_is_batch_norm_with_onnx_s_momentum_and_biased_variance(
        data, batch, channels, spatial, dtype, eps, opset):
    import normlab.functional as NF

    x, rng = _draw_input(data, (batch, channels, *spatial), dtype)
    scale, bias, mean = rng.standard_normal((3, channels)).astype(dtype)
    var = rng.uniform(0.1, 3.0, channels).astype(dtype)
    inputs = {name: array.astype(np.float64) for name, array in
              {"X": x, "S": scale, "B": bias, "M": mean, "V": var}.items()}
    rest = " ".join(f"s{i}" for i in range(len(spatial)))
    pattern = f"[b] c [{rest}]" if spatial else "[b] c"
    y = normlab.normalize(x, pattern, weight=scale, bias=bias, params="c", eps=eps, mean=mean,
                          rstd=1 / np.sqrt(var.astype(np.float64) + eps))
    _close(y, _onnx("BatchNormalization", inputs, opset, epsilon=eps), dtype)
    running_mean, running_var = mean.copy(), var.copy()
    y = NF.batch_norm(x, running_mean, running_var, scale, bias, training=True, momentum=0.1, eps=eps, unbiased=False)
    # (ONNX's float attributes are float32: its momentum is 0.9 to a relative 3e-8)
    expected = _onnx("BatchNormalization", inputs, opset, ["Y", "running_mean", "running_var"], epsilon=eps,
                     momentum=0.9, training_mode=1)
    for actual, wanted in zip((y, running_mean, running_var), expected):
        _close(actual, wanted, np.float32 if dtype is np.float64 else dtype)


@given(data=st.data(), shape=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_mean_variance_normalization_over_any_axes_is_the_readme_s_recipe(data, shape):
    x, _ = _draw_input(data, shape, np.float32)  # (ONNX's MeanVarianceNormalization runs in float32 alone)
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True), label="axes")
    pattern = " ".join(f"[a{i}]" if i in axes else f"a{i}" for i in range(len(shape))).replace("] [", " ")
    # ONNX takes the std as sqrt(E[x²] - E[x]²) in float32: keep its cancellation small
    wide = x.astype(np.float64)
    assume(np.all(wide.std(axis=tuple(axes)) > 0.1 * np.abs(wide).max(axis=tuple(axes), initial=0)))
    recipe = _readme_recipe("MeanVarianceNormalization")
    expected = _onnx("MeanVarianceNormalization", {"X": x}, 13, axes=sorted(axes))
    np.testing.assert_allclose(normlab.normalize(x, pattern, eps=float(recipe["eps"])), expected, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("pattern", ["b ([g] c) h w", "b ([g] c) [h w]", "b (a [g] c) h w", "b (a [g] c) [h w]"])
def test_num_groups_beside_a_bracketed_outer_factor_is_told_to_bracket_the_inner_one(pattern):
    # "b ([g] c) h w" with c=2 and num_groups=3 was told "pass c=3": strided sets of channels,
    # and a c that contradicts the one given; "b (a [g] c) h w" was told "pass a=3", which with
    # c=2 makes groups of one channel each
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 5))
    message = _told(lambda: normlab.normalize(x, pattern, c=2, num_groups=3))
    written, rewritten = re.search(r"write (\([^)]*\)) as (\([^)]*\))", message).groups()
    sizes = dict((name, int(size)) for name, size in re.findall(r"pass (\w+)=(\d+)", message))
    expected = _onnx("GroupNormalization", {"X": x, "S": np.ones(6), "B": np.zeros(6)}, 21, num_groups=3,
                     stash_type=11)
    fixed = pattern.replace(written, rewritten).replace("h w", "[h w]").replace("[[h w]]", "[h w]")
    np.testing.assert_allclose(normlab.normalize(x, fixed, c=2, **sizes), expected, rtol=1e-9, atol=1e-12)


def test_the_torch_norm_answers_onnx_s_attributes_as_the_numpy_api_does():
    nt = normlab_torch_or_skip()
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


def _twin(name):
    """A twin in float64 with its ONNX node: (twin, params, buffers, op, opset, attributes)."""
    nt = normlab_torch_or_skip()
    rng = np.random.default_rng(1)
    per_channel, per_group = rng.standard_normal((2, 6)), rng.standard_normal((2, 3))
    normalized, buffers = rng.standard_normal((2, 4, 5)), {"running_mean": rng.standard_normal(6),
                                                          "running_var": rng.uniform(0.5, 2.0, 6)}
    eps = float(np.float32(1e-3))  # ONNX's attributes are float32
    return {
        "GroupNorm": (nt.GroupNorm(3, 6, eps=eps), per_channel, {}, "GroupNormalization", 21,
                      {"num_groups": 3, "stash_type": 11}),
        "Norm with params='g'": (nt.Norm("b (g [c]) [h w]", params="g", g=3, eps=eps), per_group, {},
                                 "GroupNormalization", 18, {"num_groups": 3}),
        "LayerNorm": (nt.LayerNorm((4, 5), eps=eps), normalized, {}, "LayerNormalization", 17, {"axis": -2}),
        "RMSNorm": (nt.RMSNorm((4, 5), eps=eps), normalized[:1], {}, "RMSNormalization", 23, {"axis": 2}),
        "InstanceNorm2d": (nt.InstanceNorm2d(6, eps=eps, affine=True), per_channel, {}, "InstanceNormalization",
                           22, {}),
        "BatchNorm2d": (nt.BatchNorm2d(6, eps=eps).eval(), per_channel, buffers, "BatchNormalization", 15, {}),
    }[name]


@pytest.mark.parametrize("name", ["GroupNorm", "Norm with params='g'", "LayerNorm", "RMSNorm", "InstanceNorm2d",
                                  "BatchNorm2d"])
def test_each_torch_twin_gives_the_onnx_operator_it_ports_to(name):
    twin, params, buffers, op, opset, attributes = _twin(name)
    import torch

    twin = twin.double()
    with torch.no_grad():
        for parameter, value in zip((twin.weight, getattr(twin, "bias", None)), params):
            if parameter is not None:
                parameter.copy_(torch.from_numpy(value))
        for buffer, value in buffers.items():
            getattr(twin, buffer).copy_(torch.from_numpy(value))
        x = np.random.default_rng(2).standard_normal((2, 6, 4, 5))
        y = twin(torch.from_numpy(x)).numpy()
    inputs = {"X": x, "S": params[0]} | ({"B": params[1]} if len(params) > 1 else {})
    inputs |= {"mean": buffers["running_mean"], "var": buffers["running_var"]} if buffers else {}
    expected = _onnx(op, inputs, opset, epsilon=twin.eps, **attributes)
    np.testing.assert_allclose(y, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_onnx_s_stash_type_passed_as_a_keyword_is_answered_with_what_normlab_computes_in_float64(dtype):
    # it said "normlab computes in float64 whatever the input's dtype", but float32 rows apply
    # the statistics in float32: the statistics alone are float64 for every input dtype
    x = (np.random.default_rng(0).standard_normal((3, 4, 50)) + 300).astype(dtype)
    message = _told(lambda: normlab.normalize(x, "b c [d]", stash_type=1))
    assert "gathers the statistics in float64 whatever the input's dtype" in message and "drop it" in message
    y, mean, rstd = normlab.normalize(x, "b c [d]", return_stats=True)
    expected_y, expected_mean, expected_rstd = _onnx("LayerNormalization", {"X": x.astype(np.float64),
                                                                            "S": np.ones(50)}, 17,
                                                     ["Y", "Mean", "InvStdDev"], axis=-1, epsilon=1e-5)
    assert y.dtype == dtype  # "returns the input's dtype"
    # "in float64": ONNX's statistics of the input's float64 copy, where a float32 stash is off by 1e-7
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-13)
    np.testing.assert_allclose(rstd, expected_rstd, rtol=1e-11)
