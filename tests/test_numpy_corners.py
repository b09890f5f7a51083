"""Corners of the NumPy API found by trying it as NumPy users and people porting models do:
given statistics with masks and segments, byte orders, and more.

Oracles: float64 definitions written here (the per-segment instance norm and layer norm),
NumPy's own behaviour for what it accepts (``np.mean`` takes big-endian floats), and the
contract that a shape which only fits by count is refused, never reshaped.
"""

import functools
import warnings

import numpy as np
import pytest

import normlab
from normlab.errors import InputError, ShapeError

BACKENDS = ["numba", "numpy"]


def _per_segment(x, ids, eps=1e-5):
    """Instance norm of each segment of rows of ``x`` (float64): mean, rstd and y."""
    x = np.asarray(x, np.float64)
    n = ids.max() + 1
    mean = np.stack([x[ids == s].mean(axis=0) for s in range(n)])
    var = np.stack([((x[ids == s] - mean[s]) ** 2).mean(axis=0) for s in range(n)])
    rstd = 1.0 / np.sqrt(var + eps)
    return mean, rstd, (x - mean[ids]) * rstd[ids]


# --- given statistics with segments and masks -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_statistics_given_transposed_are_refused_not_reordered(backend):
    x = np.random.default_rng(0).standard_normal((5, 3))
    ids = np.array([1, 0, 1, 0, 1])
    mean, rstd, _ = _per_segment(x, ids)  # (2 segments, 3 channels)
    with pytest.raises(ShapeError, match=r"\(3, 2\).*\(2, 3\)"):
        normlab.normalize(x, "[n] c", segment_ids=ids, mean=mean.T, rstd=rstd.T, backend=backend)
    with pytest.raises(ShapeError, match="'\\[n\\] c'"):
        normlab.normalize_backward(np.ones_like(x), x, "[n] c", segment_ids=ids, mean=mean.T, rstd=rstd.T,
                                   backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_statistics_given_in_their_shape_apply_as_the_definition(backend):
    x = np.random.default_rng(1).standard_normal((5, 3))
    ids = np.array([1, 0, 1, 0, 1])
    mean, rstd, expected = _per_segment(x, ids)
    y = normlab.normalize(x, "[n] c", segment_ids=ids, mean=mean, rstd=rstd, backend=backend)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_statistics_broadcast_as_unmasked_ones_do(backend):
    """A scalar mean and rstd broadcast to every group, with a mask as without one."""
    x = np.random.default_rng(2).standard_normal((4, 3))
    mask = np.array([True, False, True])
    y = normlab.normalize(x, "b [f]", mask=mask, mean=0.5, rstd=2.0, backend=backend)
    np.testing.assert_allclose(y, (x - 0.5) * 2.0, rtol=0, atol=1e-12)
    y = normlab.normalize(x, "b [f]", mask=mask, mean=np.full(4, 0.5), rstd=np.full(4, 2.0), backend=backend)
    np.testing.assert_allclose(y, (x - 0.5) * 2.0, rtol=0, atol=1e-12)


# --- byte order ---------------------------------------------------------------------------------

def _layer_norm64(x, eps=1e-5):
    """torch's F.layer_norm over the last axis, in float64."""
    torch = pytest.importorskip("torch")

    t = torch.from_numpy(np.asarray(x, np.float64))
    return torch.nn.functional.layer_norm(t, t.shape[-1:], eps=eps).numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8"])
def test_big_endian_input_normalizes_as_numpy_computes_with_it(backend, dtype):
    """np.mean takes big-endian floats (data read from files) and gives the native dtype."""
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(dtype)
    y, mean, _ = normlab.normalize(x, "b [f]", return_stats=True, backend=backend)
    assert y.dtype == np.mean(x, axis=-1).dtype and y.dtype.isnative
    tolerance = 2e-3 if dtype == ">f2" else 1e-4
    np.testing.assert_allclose(y, _layer_norm64(x), rtol=0, atol=tolerance)
    np.testing.assert_allclose(mean[:, 0], np.mean(x.astype(np.float64), axis=-1), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_big_endian_gradients_residuals_masks_and_out_are_read_by_value(backend):
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(4)
    x, r, g = (rng.standard_normal((3, 5)) for _ in range(3))
    big = lambda a: a.astype(">f4")  # noqa: E731
    # the oracle: torch autograd through F.layer_norm of x + r, float64
    xt = torch.tensor(x.astype(np.float32).astype(np.float64) + r.astype(np.float32), requires_grad=True)
    torch.nn.functional.layer_norm(xt, (5,)).backward(torch.from_numpy(g.astype(np.float32).astype(np.float64)))
    grad_x = normlab.normalize_backward(big(g), big(x), "b [f]", backend=backend)[0]
    expected = torch.func.vjp(lambda t: torch.nn.functional.layer_norm(t, (5,)),
                              torch.from_numpy(x.astype(np.float32).astype(np.float64)))[1](
        torch.from_numpy(g.astype(np.float32).astype(np.float64)))[0].numpy()
    np.testing.assert_allclose(grad_x, expected, rtol=0, atol=1e-4)
    y, total = normlab.normalize(big(x), "b [f]", residual=big(r), backend=backend)
    np.testing.assert_allclose(y, _layer_norm64(x.astype(np.float32).astype(np.float64) + r.astype(np.float32)),
                               rtol=0, atol=1e-4)
    grads = normlab.normalize_backward(big(g), big(x), "b [f]", residual=big(r), grad_sum=big(g), backend=backend)
    np.testing.assert_allclose(grads.x, xt.grad.numpy() + g.astype(np.float32), rtol=0, atol=1e-4)
    masked = normlab.normalize(big(x), "b [f]", mask=np.ones((3, 5), bool), backend=backend)
    np.testing.assert_allclose(masked, _layer_norm64(x.astype(np.float32)), rtol=0, atol=1e-4)
    out = np.zeros((3, 5), ">f4")  # NumPy's ufuncs write into an out of either byte order
    assert normlab.normalize(x.astype(np.float32), "b [f]", out=out, backend=backend) is out
    np.testing.assert_allclose(out, _layer_norm64(x.astype(np.float32)), rtol=0, atol=1e-4)


# --- fused options of odd types ----------------------------------------------------------------------


@pytest.mark.parametrize("offset", [np.ones(6), "1", np.nan, np.inf, [1.0]])
def test_a_weight_offset_that_is_not_one_finite_number_is_an_input_error(offset):
    x = np.random.default_rng(5).standard_normal((2, 6))
    with pytest.raises(InputError, match=r"'b \[d\]', input shape \(2, 6\): weight_offset.*1\.0"):
        normlab.normalize(x, "b [d]", weight=np.ones(6), params="d", weight_offset=offset, rms=True)


@pytest.mark.parametrize("value", [np.complex64(1e-5), np.complex128(1e-5 + 1j)], ids=["complex64", "complex128"])
@pytest.mark.parametrize("name", ["eps", "weight_offset"])
@pytest.mark.parametrize("backward", [False, True])
def test_a_numpy_complex_eps_or_weight_offset_is_refused_as_a_python_complex_is(name, value, backward):
    """float() took a NumPy complex with a ComplexWarning and dropped its imaginary part
    (1e-5+1j normalized as 1e-5), where 1e-5+0j, a Python complex, was an InputError."""
    x = np.random.default_rng(12).standard_normal((2, 6))
    call = functools.partial(normlab.normalize_backward, np.ones_like(x)) if backward else normlab.normalize
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (NumPy 2 writes the value np.complex128(1e-05+1j), NumPy 1.x (1e-05+1j))
        with pytest.raises(InputError, match=rf"{name} must be a (real )?number, got (np.complex\d+)?\(1e-05"):
            call(x, "b [d]", weight=np.ones(6), params="d", **{name: value})


@pytest.mark.parametrize("offset", [np.float32(0.0), np.array(0.0), np.float64(1.0), np.array(1.0), 1])
def test_a_weight_offset_given_as_a_numpy_number_is_gemmas_one_plus_weight(offset):
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 6)), rng.standard_normal(6)
    t = torch.from_numpy(x)
    expected = (torch.nn.functional.rms_norm(t, (6,), eps=1e-6) * (float(offset) + torch.from_numpy(w))).numpy()
    y = normlab.normalize(x, "b [d]", weight=w, params="d", weight_offset=offset, rms=True, eps=1e-6)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["grad_y", "grad_sum"])
def test_fused_backward_refuses_a_complex_gradient_as_the_plain_one_does(backend, which):
    x = np.random.default_rng(7).standard_normal((2, 4))
    bad = x.astype(np.complex128) + 1j
    grads = {"grad_y": np.ones_like(x), "grad_sum": np.ones_like(x), which: bad}
    with pytest.raises(InputError, match=f"'b \\[d\\]', input shape \\(2, 4\\): {which} dtype complex128"):
        normlab.normalize_backward(grads["grad_y"], x, "b [d]", residual=x, grad_sum=grads["grad_sum"], backend=backend)
    with pytest.raises(InputError, match="grad_y dtype complex128"):
        normlab.normalize_backward(bad, x, "b [d]", backend=backend)


@pytest.mark.parametrize("path, which", [("plain", "grad_y"), ("fused", "grad_y"), ("fused", "grad_sum"),
                                         ("masked", "grad_y")])
def test_a_gradient_of_an_unsupported_dtype_is_told_to_cast_itself_not_x(path, which):
    # the message named the gradient, then told the caller to cast x (x.astype(np.float32)), which
    # was already a float array
    x = np.random.default_rng(7).standard_normal((2, 4))
    grads = {"grad_y": np.ones_like(x), "grad_sum": np.ones_like(x), which: x.astype(np.complex128) + 1j}
    extra = {"plain": {}, "fused": dict(residual=x, grad_sum=grads["grad_sum"]),
             "masked": dict(mask=np.ones((2, 4), bool))}[path]
    with pytest.raises(InputError) as info:
        normlab.normalize_backward(grads["grad_y"], x, "b [d]", **extra)
    message = str(info.value)
    assert f"{which} dtype complex128" in message and f"cast with {which}.astype(np.float32)" in message
    assert "x.astype" not in message


def test_an_input_of_an_unsupported_dtype_is_told_to_cast_x():
    with pytest.raises(InputError, match=r"input dtype complex128 .*cast with x\.astype\(np\.float32\)"):
        normlab.normalize(np.ones((2, 4), np.complex128), "b [d]")


# --- torch-style functions: arguments torch refuses, and buffers they cannot write --------------------

def test_a_read_only_running_buffer_is_refused_before_either_buffer_moves():
    """Training writes both buffers in place: a read-only one is refused up front, so the
    other is not left half updated; in evaluation a read-only buffer is only read, as in torch."""
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(8).standard_normal((4, 3, 5))
    for frozen in ("mean", "var"):
        running_mean, running_var = np.zeros(3), np.ones(3)
        (running_mean if frozen == "mean" else running_var).flags.writeable = False
        with pytest.raises(InputError, match=f"running_{frozen} is read-only.*np.array"):
            normlab.functional.batch_norm(x, running_mean, running_var, training=True)
        assert running_mean.tolist() == [0.0] * 3 and running_var.tolist() == [1.0] * 3
        with pytest.raises(InputError, match=f"running_{frozen} is read-only"):
            normlab.functional.instance_norm(x, running_mean, running_var, use_input_stats=True)
        assert running_mean.tolist() == [0.0] * 3 and running_var.tolist() == [1.0] * 3
        y = normlab.functional.batch_norm(x, running_mean, running_var, training=False)
        expected = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.zeros(3, dtype=torch.float64),
                                                  torch.ones(3, dtype=torch.float64), training=False)
        np.testing.assert_allclose(y, expected.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda x: normlab.functional.batch_norm(x, None, None, training="False"),
    lambda x: normlab.functional.batch_norm(x, None, None, training=np.array([1, 0])),
    lambda x: normlab.functional.instance_norm(x, use_input_stats="False"),
    lambda x: normlab.functional.batch_norm(x, None, None, training=True, axis=1.0),
    lambda x: normlab.functional.batch_norm(x, None, None, training=True, axis="1"),
    lambda x: normlab.functional.layer_norm(x, 5.0),
    lambda x: normlab.functional.layer_norm(x, "5"),
    lambda x: normlab.functional.layer_norm(x, (3.0, 5.0)),
    lambda x: normlab.functional.layer_norm(x, 5, eps="1e-5"),
    lambda x: normlab.functional.rms_norm(x, 5, eps="1e-5"),
    lambda x: normlab.normalize(x, "b c [d]", eps="1e-5"),
], ids=["training str", "training array", "use_input_stats str", "axis float", "axis str",
        "normalized_shape float", "normalized_shape str", "normalized_shape floats", "eps str", "rms eps str",
        "normalize eps str"])
def test_arguments_torch_refuses_are_input_errors_naming_the_input(call):
    """torch.nn.functional raises on each (a string is not a bool, a float not a size);
    normlab took "False" as training=True and "5" as a size, or failed inside NumPy."""
    x = np.random.default_rng(9).standard_normal((4, 3, 5)).astype(np.float32)
    with pytest.raises(InputError, match=r"\(4, 3, 5\)"):
        call(x)


@pytest.mark.parametrize("training", [np.True_, 1, True])
def test_numpy_and_integer_flags_train_as_true_does(training):
    """np.True_ and 1 are taken as True (as normalize takes its flags); the oracle is torch with True."""
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(10).standard_normal((4, 3, 5))
    running_mean, running_var = np.zeros(3), np.ones(3)
    mean_t, var_t = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), mean_t, var_t, training=True)
    y = normlab.functional.batch_norm(x, running_mean, running_var, training=training)
    np.testing.assert_allclose(y, expected.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(running_var, var_t.numpy(), rtol=1e-12)


# --- repeated calls and given statistics --------------------------------------------------------------


def test_an_eps_too_large_for_a_float_is_an_input_error_on_a_repeated_call_too():
    """The repeated call's fast path took any int; 10**400 reached the kernel (OverflowError)."""
    x = np.random.default_rng(11).standard_normal((4, 6)).astype(np.float32)
    w = np.ones(6, np.float32)
    for _ in range(3):  # the fast path is built on the first successful call
        normlab.normalize(x, "b [f]", weight=w, params="f")
    with pytest.raises(InputError, match=r"eps=10000.*'b \[f\]', input shape \(4, 6\)"):
        normlab.normalize(x, "b [f]", weight=w, params="f", eps=10**400)
    np.testing.assert_allclose(normlab.normalize(x, "b [f]", weight=w, params="f", eps=10**300),
                               _layer_norm64(x, eps=1e300), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
def test_backward_refuses_a_mean_without_its_rstd_as_the_forward_does(backend, fused):
    """A mean given alone was dropped and the statistics recomputed from x."""
    x = np.random.default_rng(12).standard_normal((3, 5))
    extra = {"residual": np.zeros_like(x)} if fused else {}
    with pytest.raises(InputError, match=r"'b \[f\]', input shape \(3, 5\): mean was given without rstd"):
        normlab.normalize_backward(np.ones_like(x), x, "b [f]", mean=np.zeros((3, 1)), backend=backend, **extra)
    with pytest.raises(InputError, match="pass both"):
        normlab.normalize(x, "b [f]", mean=np.zeros((3, 1)), backend=backend, **extra)


# --- nested lists NumPy cannot read ---------------------------------------------------------------------

RAGGED = [[1.0, 2.0], [3.0]]


@pytest.mark.parametrize("name, call", [
    ("x", lambda x: normlab.normalize(RAGGED, "b [f]")),
    ("weight", lambda x: normlab.normalize(x, "b c [d]", weight=RAGGED, params="d")),
    ("mask", lambda x: normlab.normalize(x, "b c [d]", mask=RAGGED)),
    ("segment_ids", lambda x: normlab.normalize(x, "[b] c d", segment_ids=RAGGED)),
    ("mean", lambda x: normlab.normalize(x, "b c [d]", mean=RAGGED, rstd=1.0)),
    ("residual", lambda x: normlab.normalize(x, "b c [d]", residual=RAGGED)),
    ("scale", lambda x: normlab.normalize(x, "b c [d]", scale=RAGGED, modulation="b d")),
    ("grad_y", lambda x: normlab.normalize_backward(RAGGED, x, "b c [d]")),
    ("grad_y", lambda x: normlab.normalize_backward(RAGGED, x, "b c [d]", mask=np.ones(4, bool))),
    ("grad_sum", lambda x: normlab.normalize_backward(np.ones_like(x), x, "b c [d]", residual=x, grad_sum=RAGGED)),
])
def test_a_ragged_list_is_an_input_error_naming_the_argument_and_the_pattern(name, call):
    """np.asarray refuses rows of unequal length with a bare ValueError (np.mean too);
    normlab says which argument it was and under which pattern."""
    x = np.random.default_rng(13).standard_normal((2, 3, 4))
    with pytest.raises(InputError, match=rf"pattern '[^']*'.*: {name} cannot be read as an array.*same length"):
        call(x)


@pytest.mark.parametrize("modulation, says", [
    ("b b", "axis 'b' appears twice in modulation"),
    ("z", "modulation 'z' names axis 'z'"),
    ("", "empty modulation: name the axes scale and shift span"),
    (3, "modulation is a string"),
])
def test_a_bad_modulation_is_named_as_modulation_not_params(modulation, says):
    """The modulation axes are parsed as params; the error spoke of params, which the caller never passed."""
    x = np.random.default_rng(14).standard_normal((2, 3, 4))
    with pytest.raises(normlab.errors.NormlabError, match=rf"{says}.*'b c \[d\]'.*\(2, 3, 4\)") as caught:
        normlab.normalize(x, "b c [d]", scale=np.ones((2, 4)), modulation=modulation)
    assert "params" not in str(caught.value)


@pytest.mark.parametrize("call", [
    lambda t: normlab.normalize(t, "b [d]"),
    lambda t: normlab.normalize(t.detach().numpy(), "b [d]", weight=t[0], params="d"),
    lambda t: normlab.normalize_backward(t, t.detach().numpy(), "b [d]"),
    lambda t: normlab.functional.layer_norm(t, 4),
    lambda t: normlab.functional.layer_norm([[1.0, 2.0], [3.0]], 2),
], ids=["x", "weight", "grad_y", "functional", "functional ragged"])
def test_a_tensor_that_requires_grad_is_an_input_error_that_says_detach(call):
    """torch refuses .numpy() of such a tensor with a RuntimeError; normlab passes its advice on in an InputError."""
    torch = pytest.importorskip("torch")

    t = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(InputError, match=r"cannot be read as an array \((Can't call numpy\(\).*detach|setting)"):
        call(t)


@pytest.mark.parametrize("backward", [False, True])
def test_a_mask_with_a_fused_option_is_refused_naming_the_pattern_and_shape(backward):
    x = np.random.default_rng(15).standard_normal((2, 5))
    call = (lambda **k: normlab.normalize_backward(np.ones_like(x), x, "b [d]", **k)) if backward else (
        lambda **k: normlab.normalize(x, "b [d]", **k))
    with pytest.raises(InputError, match=r"pattern 'b \[d\]', input shape \(2, 5\): mask= and segment_ids= do not"):
        call(mask=np.ones(5, bool), residual=x)


@pytest.mark.parametrize("flag", ["False", None, np.array([1, 0]), 2])
def test_return_stats_that_is_not_a_boolean_is_an_input_error_as_rms_is(flag):
    """return_stats="False" returned the statistics (a string is truthy); rms= refused it already."""
    x = np.random.default_rng(16).standard_normal((2, 5))
    for _ in range(2):  # the repeated call's fast path too
        normlab.normalize(x, "b [d]")
    for extra in ({}, {"mask": np.ones(5, bool)}, {"residual": x}):
        with pytest.raises(InputError, match=r"return_stats must be True or False.*'b \[d\]', input shape \(2, 5\)"):
            normlab.normalize(x, "b [d]", return_stats=flag, **extra)


@pytest.mark.parametrize("flag, returns_stats", [(np.True_, True), (np.False_, False), (1, True), (0, False)])
def test_numpy_and_integer_return_stats_mean_what_they_say(flag, returns_stats):
    x = np.random.default_rng(17).standard_normal((2, 5))
    result = normlab.normalize(x, "b [d]", return_stats=flag)
    y = result[0] if returns_stats else result
    assert isinstance(result, tuple) == returns_stats
    np.testing.assert_allclose(y, _layer_norm64(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["weight", "residual", "scale"])
def test_a_parameter_of_an_unsupported_dtype_is_refused_with_the_pattern_and_the_cast(name):
    """A complex array is refused with the pattern and the cast in the message, where it said
    "pass a float array" (bfloat16 ones, which this test used to refuse, are taken since:
    tests/test_numpy_inputs.py)."""
    x = np.random.default_rng(18).standard_normal((2, 4))
    shapes = {"weight": (4,), "residual": (2, 4), "scale": (2, 4)}
    value = np.ones(shapes[name], np.complex64)
    extra = {"weight": {"params": "d"}, "residual": {}, "scale": {"modulation": "b d"}}[name]
    with pytest.raises(normlab.errors.NormlabError,
                       match=rf"'b \[d\]', input shape \(2, 4\): {name} has dtype complex64.*{name}\.astype\(np\.float32\)"):
        normlab.normalize(x, "b [d]", **{name: value}, **extra)


@pytest.mark.parametrize("mask, error", [
    (np.ones((2, 6), bool), ShapeError),
    ([[True], [True, False]], InputError),
    (np.ones((3, 1, 6), np.int64), InputError),
])
def test_functional_batch_norm_checks_its_mask_before_counting_with_it(mask, error):
    """Training counts each channel's values first; a mask that does not broadcast (or is
    ragged) failed there with NumPy's bare ValueError, before the engine's checks."""
    x = np.random.default_rng(19).standard_normal((3, 4, 6))
    with pytest.raises(error, match=r"'\[a0\] a1 \[a2\]', input shape \(3, 4, 6\): mask"):
        normlab.functional.batch_norm(x, np.zeros(4), np.ones(4), training=True, mask=mask)


def test_functional_batch_norm_with_a_broadcast_mask_trains_as_torch_on_the_counted_values():
    torch = pytest.importorskip("torch")

    x = np.random.default_rng(20).standard_normal((3, 4, 6))
    mask = np.arange(6) < 4  # the last two positions are padding
    running_mean, running_var = np.zeros(4), np.ones(4)
    y = normlab.functional.batch_norm(x, running_mean, running_var, training=True, mask=mask)
    mean_t, var_t = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x[..., :4].copy()), mean_t, var_t, training=True)
    np.testing.assert_allclose(y[..., :4], expected.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(running_var, var_t.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"gate": np.zeros((2, 4))}, {"mask": np.ones(4, bool)}], ids=["plain", "gate", "mask"])
def test_a_grad_sum_without_a_residual_is_refused_not_ignored_or_added(backend, extra):
    """Without residual= there is no x + residual: the plain backward dropped grad_sum and the
    gated one added it to grad x, two answers to a question with none."""
    x = np.random.default_rng(21).standard_normal((2, 4))
    with pytest.raises(InputError, match=r"'b \[d\]', input shape \(2, 4\): grad_sum .* no residual was given"):
        normlab.normalize_backward(np.ones_like(x), x, "b [d]", grad_sum=np.ones_like(x), backend=backend, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [3, 2.5, True, np.array(3), np.array(2.5, np.float32)], ids=repr)
def test_a_zero_dimensional_input_under_an_ellipsis_is_one_group_of_one_element(backend, value):
    # a Python number or 0-d array with "[...]": mean x, variance 0; RMS divides by sqrt(x² + eps)
    x = float(value)
    y, mean, rstd = normlab.normalize(value, "[...]", backend=backend, return_stats=True)
    assert y.shape == mean.shape == rstd.shape == () and y == 0.0 and mean == x
    np.testing.assert_allclose(rstd, 1 / np.sqrt(1e-5))
    y_rms = normlab.normalize(value, "[...]", rms=True, backend=backend)
    np.testing.assert_allclose(y_rms, x / np.sqrt(x * x + 1e-5), rtol=1e-6)
    grad_x, _, _ = normlab.normalize_backward(1.0, value, "[...]", backend=backend)
    assert grad_x.shape == () and grad_x == 0.0


# --- an empty reduced axis ------------------------------------------------------------------


def _torch_statistics(call):
    torch = pytest.importorskip("torch")
    return lambda shape: [t.numpy() for t in call(torch, torch.zeros(shape, dtype=torch.float64))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, pattern, keywords, torch_statistics", [
    ((2, 0), "b [d]", {}, lambda torch, x: torch.native_layer_norm(x, (0,), None, None, 1e-5)[1:]),
    ((2, 3, 0), "b [c t]", {}, lambda torch, x: torch.native_layer_norm(x, (3, 0), None, None, 1e-5)[1:]),
    ((2, 4, 0), "b (g [c]) [t]", {"g": 2},
     lambda torch, x: torch.native_group_norm(x, None, None, 2, 4, 0, 2, 1e-5)[1:]),
    ((2, 0), "b [d]", {"rms": True}, lambda torch, x: torch.ops.aten._fused_rms_norm(x, [0], None, 1e-5)[1:]),
], ids=["layer norm", "layer norm over two axes", "group norm", "rms norm"])
def test_an_empty_reduced_axis_gives_torch_s_statistics_mean_0_and_rstd_nan(backend, shape, pattern, keywords,
                                                                            torch_statistics):
    """Groups of no elements got rstd = 1/sqrt(eps), a number no data gave (316 at eps=1e-5);
    torch's kernels give mean 0 and rstd NaN, as ONNX's reference does for the rstd."""
    expected = _torch_statistics(torch_statistics)(shape)
    y, *statistics = normlab.normalize(np.zeros(shape), pattern, return_stats=True, backend=backend, **keywords)
    assert y.shape == shape
    statistics = [s for s in statistics if s is not None]  # (rms: no mean)
    for actual, wanted in zip(statistics, expected, strict=True):
        np.testing.assert_array_equal(actual.reshape(-1), wanted.reshape(-1))
