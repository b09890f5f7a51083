"""normlab.functional against torch.nn.functional (and ONNX for the biased running variance):
running statistics over several steps, evaluation mode, channels-last, eps defaults."""

import re

import numpy as np
import pytest

from normlab import functional as NF
from normlab.errors import InputError, ParamsError, ShapeError

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _batches(shape, steps, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (1 + i) + i).astype(dtype) for i in range(steps)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 7), (4, 3, 5, 6), (2, 3, 4, 3, 5)])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batch_norm_running_statistics_follow_torch_over_several_steps(shape, dtype, momentum):
    channels = shape[1]
    rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
    trm, trv = torch.zeros(channels, dtype=torch.from_numpy(rm).dtype), torch.ones(channels, dtype=torch.from_numpy(rv).dtype)
    weight = np.linspace(0.5, 2, channels).astype(dtype)
    bias = np.linspace(-1, 1, channels).astype(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for x in _batches(shape, 4, dtype):
        y = NF.batch_norm(x, rm, rv, weight, bias, training=True, momentum=momentum)
        expected = F.batch_norm(torch.tensor(x), trm, trv, torch.tensor(weight), torch.tensor(bias), training=True,
                                momentum=momentum)
        np.testing.assert_allclose(y, expected.numpy(), **tol)
        np.testing.assert_allclose(rm, trm.numpy(), **tol)
        np.testing.assert_allclose(rv, trv.numpy(), **tol)
    assert rm.dtype == dtype and rv.dtype == dtype
    x = _batches(shape, 1, dtype, seed=9)[0]
    y = NF.batch_norm(x, rm, rv, weight, bias, training=False)
    expected = F.batch_norm(torch.tensor(x), trm, trv, torch.tensor(weight), torch.tensor(bias), training=False)
    np.testing.assert_allclose(y, expected.numpy(), **tol)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("param_shape", [(3, 1), (1, 3), (1, 3, 1)])
def test_batch_norm_takes_a_weight_and_bias_of_c_elements_in_any_shape_as_torch_does(param_shape, training):
    # torch.nn.functional.batch_norm checks only their element count; a (3, 1) weight was refused here
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5))
    weight, bias = (rng.standard_normal(3).reshape(param_shape) for _ in range(2))
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    y = NF.batch_norm(x, rm, rv, weight, bias, training=training)
    expected = F.batch_norm(torch.tensor(x), trm, trv, torch.tensor(weight), torch.tensor(bias), training=training)
    for got, want in ((y, expected), (rm, trm), (rv, trv)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="elements"):  # another count: torch refuses it, and so does normlab
        F.batch_norm(torch.tensor(x), trm, trv, torch.ones(4, 1), training=training)
    with pytest.raises(ParamsError, match="weight"):
        NF.batch_norm(x, rm, rv, np.ones((4, 1)), training=training)


@pytest.mark.parametrize("call", [
    lambda x, w: NF.group_norm(x, 3, w, w), lambda x, w: NF.instance_norm(x, weight=w, bias=w),
    lambda x, w: NF.batch_norm(x, np.zeros(6), np.ones(6), w, w, training=True),
], ids=["group_norm", "instance_norm", "batch_norm"])
def test_a_weight_of_the_wrong_size_is_refused_in_the_functions_terms_with_onnx_per_group_scale_named(call):
    # the message spoke of params='(g c)' and pattern 'n (g [c]) [s2]', which the caller never
    # wrote, and offered "or change params", an argument these functions do not take
    x = np.ones((2, 6, 4))
    with pytest.raises(ParamsError) as caught:
        call(x, np.ones(3))
    message = str(caught.value)
    assert "has shape (3,), but the input has 6 channels" in message and "pass a weight of shape (6,)" in message
    assert "params" not in message and "pattern" not in message
    # ONNX GroupNormalization-18's one scale per group, expanded as the message says, is group_norm's
    if "group_norm" in message:
        import normlab

        assert "np.repeat(weight, 2)" in message
        w = np.array([1.0, 2.0, -1.0])
        expected = normlab.normalize(x, "b (g [c]) [s]", g=3, weight=w, bias=w, params="g")
        np.testing.assert_allclose(NF.group_norm(x, 3, np.repeat(w, 2), np.repeat(w, 2)), expected, rtol=1e-12)


def test_channels_last_batch_norm_equals_torch_on_the_moved_axis():
    rm, rv = np.zeros(3), np.ones(3)
    trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for x in _batches((4, 5, 6, 3), 3, np.float64):
        y = NF.batch_norm(x, rm, rv, training=True, axis=-1)
        expected = F.batch_norm(torch.tensor(x).permute(0, 3, 1, 2), trm, trv, training=True).permute(0, 2, 3, 1)
        np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)


def _onnx_batch_norm_training(x, scale, bias, mean, var, momentum):
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y", "rm", "rv"],
                            training_mode=1, momentum=momentum, epsilon=1e-5)
    inputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in ["X", "scale", "B", "mean", "var"]]
    outputs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in ["Y", "rm", "rv"]]
    model = helper.make_model(helper.make_graph([node], "bn", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 15)])
    return ReferenceEvaluator(model).run(None, {"X": x, "scale": scale, "B": bias, "mean": mean, "var": var})


def test_biased_running_variance_matches_onnx_batch_normalization():
    pytest.importorskip("onnx")
    x = _batches((6, 4, 5), 1, np.float64)[0]
    rm, rv = np.full(4, 0.5), np.full(4, 2.0)
    # ONNX's momentum keeps the old value: ONNX momentum 0.9 is our momentum 0.1
    _, onnx_rm, onnx_rv = _onnx_batch_norm_training(x, np.ones(4), np.zeros(4), rm.copy(), rv.copy(), 0.9)
    NF.batch_norm(x, rm, rv, training=True, momentum=0.1, unbiased=False)
    np.testing.assert_allclose(rm, onnx_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, onnx_rv, rtol=1e-6)


def test_layer_norm_statistics_have_onnx_layer_normalization_shapes():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    import normlab

    x = _batches((2, 3, 4, 5), 1, np.float32)[0]
    node = helper.make_node("LayerNormalization", ["X", "S"], ["Y", "Mean", "InvStdDev"], axis=2, epsilon=1e-5)
    graph = helper.make_graph(
        [node], "ln",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None), helper.make_tensor_value_info("S", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ["Y", "Mean", "InvStdDev"]],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y_onnx, mean_onnx, rstd_onnx = ReferenceEvaluator(model).run(None, {"X": x, "S": np.ones((4, 5), np.float32)})
    y, mean, rstd = normlab.normalize(x, "a0 a1 [a2 a3]", return_stats=True)
    assert mean.shape == mean_onnx.shape == rstd.shape == rstd_onnx.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(mean, mean_onnx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rstd, rstd_onnx, rtol=1e-4)
    np.testing.assert_allclose(y, y_onnx, rtol=1e-4, atol=1e-5)


def _onnx_one_node(op, x, opset, **attributes):
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    dtype = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph([helper.make_node(op, ["X"], ["Y"], **attributes)], op,
                              [helper.make_tensor_value_info("X", dtype, None)],
                              [helper.make_tensor_value_info("Y", dtype, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    with np.errstate(invalid="ignore", divide="ignore"):  # (LpNormalization divides an all-zero group, then masks it)
        return ReferenceEvaluator(model).run(None, {"X": x})[0]


def test_readme_recipes_give_onnx_mean_variance_and_l2_normalization():
    pytest.importorskip("onnx")
    import normlab

    x = _batches((2, 3, 4, 5), 1, np.float32)[0]
    x[0, 1] = 2.5  # a constant group: ONNX gives 0 (its 1e-9 is outside the root)
    expected = _onnx_one_node("MeanVarianceNormalization", x, 13, axes=[2, 3])  # (float constants inside)
    np.testing.assert_allclose(normlab.normalize(x, "a0 a1 [a2 a3]", eps=1e-18), expected, rtol=1e-5, atol=1e-5)
    x = x.astype(np.float64)
    x[1, 2] = 0.0  # an all-zero group: ONNX gives 0
    expected = _onnx_one_node("LpNormalization", x.reshape(6, 20), 22, axis=-1, p=2).reshape(x.shape)
    y = normlab.normalize(x, "a0 a1 [a2 a3]", rms=True, eps=5e-324, weight=np.full((4, 5), 20 ** -0.5), params="a2 a3")
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_instance_norm_running_statistics_average_the_instances_as_torch_does(dtype):
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    for x in _batches((4, 3, 5, 2), 3, dtype):
        y = NF.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.2)
        expected = F.instance_norm(torch.tensor(x), trm, trv, use_input_stats=True, momentum=0.2)
        np.testing.assert_allclose(y, expected.numpy(), **tol)
    np.testing.assert_allclose(rm, trm.numpy(), **tol)
    np.testing.assert_allclose(rv, trv.numpy(), **tol)
    x = _batches((2, 3, 5, 2), 1, dtype, seed=4)[0]
    weight, bias = np.array([1.0, 2.0, 0.5], dtype), np.array([0.0, -1.0, 1.0], dtype)
    y = NF.instance_norm(x, rm, rv, weight, bias, use_input_stats=False)
    expected = F.instance_norm(torch.tensor(x), trm, trv, torch.tensor(weight), torch.tensor(bias), use_input_stats=False)
    np.testing.assert_allclose(y, expected.numpy(), **tol)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rms_norm_default_eps_matches_torch_for_every_dtype(dtype):
    # tiny values make eps dominate, so the wrong default would show
    x = (np.random.default_rng(0).standard_normal((3, 8)) * 1e-3).astype(dtype)
    expected = F.rms_norm(torch.tensor(x), (8,)).numpy()
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(NF.rms_norm(x, 8), expected, **tol)


def test_group_norm_with_channels_last_axis_equals_torch_on_the_moved_axis():
    x = _batches((2, 5, 4, 6), 1, np.float64)[0]
    weight = np.linspace(0.5, 1.5, 6)
    y = NF.group_norm(x, 3, weight, weight, axis=-1)
    expected = F.group_norm(torch.tensor(x).permute(0, 3, 1, 2), 3, torch.tensor(weight), torch.tensor(weight))
    np.testing.assert_allclose(y, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-12, atol=1e-12)


def test_training_batch_norm_with_one_value_per_channel_raises_like_torch():
    x = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.tensor(x), None, None, training=True)
    with pytest.raises(InputError, match=r"more than 1 value per channel.*\(1, 3\)"):
        NF.batch_norm(x, None, None, training=True)
    NF.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=False)  # evaluation needs no batch


def test_training_instance_norm_with_one_position_raises_like_torch():
    x = np.ones((2, 3, 1), np.float32)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        F.instance_norm(torch.tensor(x))
    with pytest.raises(InputError, match="more than 1 spatial element"):
        NF.instance_norm(x)


@pytest.mark.parametrize("shape, groups", [((1, 3), 3), ((1, 4, 1), 4), ((1, 1), 1)])
def test_group_norm_of_one_sample_with_one_value_per_group_raises_like_torch(shape, groups):
    """It returned zeros where torch.nn.functional.group_norm (and the torch twin GroupNorm)
    raise "Expected more than 1 value per channel when training"."""
    x = np.random.default_rng(8).standard_normal(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.group_norm(torch.tensor(x), groups)
    with pytest.raises(InputError, match=rf"more than 1 value per channel.*{re.escape(str(shape))}.*num_groups"):
        NF.group_norm(x, groups)
    two = np.concatenate([x, x + 1.0])  # two samples (or bigger groups) normalize, as in torch
    np.testing.assert_allclose(NF.group_norm(two, groups), F.group_norm(torch.tensor(two), groups).numpy(), atol=1e-6)


@pytest.mark.parametrize("function, torch_function", [(NF.layer_norm, F.layer_norm), (NF.rms_norm, F.rms_norm)])
def test_a_0d_input_is_refused_without_suggesting_a_normalized_shape_that_is_refused_too(function, torch_function):
    """It was told "pass normalized_shape=()", which the next call refuses ("names no axis")."""
    with pytest.raises((RuntimeError, ValueError)):  # torch refuses a 0-d input too
        torch_function(torch.tensor(3.0), (1,))
    with pytest.raises(ShapeError, match=r"input shape \(\); a 0-d input has no axis.*last sizes are \(1,\)") as caught:
        function(np.float32(3.0), 1)
    assert "normalized_shape=()" not in str(caught.value)


_X = np.zeros((4, 3))
_REFUSALS = {
    "evaluation without running statistics": lambda: NF.batch_norm(_X, None, None, training=False),
    "evaluation with running_mean alone": lambda: NF.batch_norm(_X, np.zeros(3), None, training=False),
    "instance norm without running statistics": lambda: NF.instance_norm(_X[None], use_input_stats=False),
    "num_groups of 0": lambda: NF.group_norm(_X, 0),
    "integer running_mean": lambda: NF.batch_norm(_X, np.zeros(3, np.int64), np.ones(3), training=True),
    "running_mean as a list": lambda: NF.batch_norm(_X, [0.0] * 3, np.ones(3), training=True),
    "running_mean of 4 values": lambda: NF.batch_norm(_X, np.zeros(4), np.ones(4), training=True),
}


@pytest.mark.parametrize("call", _REFUSALS.values(), ids=list(_REFUSALS))
def test_a_refused_functional_call_names_the_input_shape_and_a_fix(call):
    """These said only the rule ("running_mean and running_var are needed when training=False",
    "num_groups must be a positive int, got 0"), without the input's shape or what to pass."""
    with pytest.raises(ValueError, match=r"input shape \(1?,? ?4, 3\).*pass "):
        call()


@pytest.mark.parametrize("masked", [False, True])
def test_float16_and_float32_running_statistics_are_the_update_rounded_once(masked):
    """The update ran in the buffer's dtype, rounding 0.9·running, 0.1·batch and their sum
    apart: where the two terms cancel, float16 buffers landed hundreds of units in the last
    place from the value (float32 too). float16 now has torch's bits, which it computes in
    float32 and rounds once; float32 is within half a unit of torch's float64 update."""
    rng = np.random.default_rng(9)
    x64 = rng.standard_normal((8, 16, 5)) * 3 + 1
    start_mean, start_var = rng.standard_normal(16), np.abs(rng.standard_normal(16)) + 0.5
    for dtype, torch_dtype in ((np.float16, torch.float16), (np.float32, torch.float32)):
        x, mean, var = (a.astype(dtype) for a in (x64, start_mean, start_var))
        torch_mean, torch_var = torch.tensor(mean), torch.tensor(var)
        exact_mean, exact_var = (torch.tensor(a, dtype=torch.float64) for a in (mean, var))
        NF.batch_norm(x, mean, var, training=True, mask=np.ones(x.shape, bool) if masked else None)
        F.batch_norm(torch.tensor(x), torch_mean, torch_var, training=True)
        F.batch_norm(torch.tensor(x, dtype=torch.float64), exact_mean, exact_var, training=True)
        if dtype == np.float16:
            np.testing.assert_array_equal(mean, torch_mean.numpy())
            np.testing.assert_array_equal(var, torch_var.numpy())
        for ours, exact in ((mean, exact_mean.numpy()), (var, exact_var.numpy())):
            half_unit = np.spacing(np.abs(exact).astype(dtype)).astype(np.float64) / 2
            assert (np.abs(ours - exact) <= half_unit * (1 + 1e-6)).all(), dtype


def test_running_statistics_are_untouched_in_evaluation():
    rm, rv = np.array([0.5, -0.5]), np.array([2.0, 3.0])
    NF.batch_norm(np.random.default_rng(0).standard_normal((4, 2)), rm, rv, training=False)
    np.testing.assert_array_equal(rm, [0.5, -0.5])
    np.testing.assert_array_equal(rv, [2.0, 3.0])


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm"])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_one_running_buffer_without_the_other_raises_like_torch_and_moves_nothing(name, given):
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    buffers = {"running_mean": None, "running_var": None, given: np.full(3, 0.5, np.float32)}
    train = {"training": True} if name == "batch_norm" else {"use_input_stats": True}
    with pytest.raises(ValueError, match="either both be None or neither"):
        getattr(F, name)(torch.tensor(x), *(None if b is None else torch.tensor(b) for b in buffers.values()), **train)
    with pytest.raises(InputError, match=f"both be None, as torch requires; got {given} and no"):
        getattr(NF, name)(x, *buffers.values(), **train)
    np.testing.assert_array_equal(buffers[given], 0.5)
    getattr(NF, name)(x[:0], *buffers.values(), **train)  # torch returns an empty input before it checks


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (4, 3, 0)])
@pytest.mark.parametrize("buffers", ["neither", "running_mean", "running_var"])
def test_evaluation_batch_norm_of_an_empty_input_needs_no_running_statistics_as_in_torch(shape, buffers):
    x = np.zeros(shape, np.float32)
    given = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    rm, rv = (given[name] if name == buffers else None for name in ("running_mean", "running_var"))
    expected = F.batch_norm(torch.tensor(x), *(None if b is None else torch.tensor(b) for b in (rm, rv)), training=False)
    y = NF.batch_norm(x, rm, rv, training=False)
    assert y.shape == tuple(expected.shape) and y.dtype == np.float32
    with pytest.raises(InputError, match="needed when training=False"):  # a batch with values still needs them
        NF.batch_norm(np.ones((2, 3), np.float32), rm, rv, training=False)
