"""The NumPy API keeps NumPy's contract where a silent fault once hid: overlapping out=,
statistics that must broadcast, masked arrays, flags of any integer type, and the
arguments that used to fail with bare NumPy or Python errors.

Oracles: float64 layer and batch norm written from the definition here, NumPy's own
semantics (an overlapping out= behaves as if there were no overlap), and Numba's
dispatcher (which signatures a kernel compiled).
"""

import numpy as np
import pytest

import normlab
from normlab import functional as NF
from normlab.errors import InputError, ShapeError

BACKENDS = ["numba", "numpy"]


def _definition(x, axes, eps=1e-5):
    """(x − mean)/sqrt(var + eps) over ``axes`` in float64, the biased variance."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


# --- out= that overlaps x ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, axes", [("b [d]", (1,)), ("[b] d", (0,))])
@pytest.mark.parametrize("shift", [1, -1, 7])
def test_out_shifted_over_x_gives_what_a_separate_out_gives(backend, pattern, axes, shift):
    rng = np.random.default_rng(0)
    buffer = rng.standard_normal(64 * 33 + 8) * 3 + 1
    start_x, start_out = (8, 8 - shift) if shift > 0 else (0, -shift)
    x = buffer[start_x:start_x + 64 * 33].reshape(64, 33)
    out = buffer[start_out:start_out + 64 * 33].reshape(64, 33)
    expected = _definition(x, axes)  # taken before the call, which overwrites x's memory
    result = normlab.normalize(x, pattern, out=out, backend=backend)
    assert result is out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_as_the_transpose_of_x_gives_what_a_separate_out_gives(backend):
    x = np.random.default_rng(1).standard_normal((40, 40))
    expected = _definition(x, (1,))
    normlab.normalize(x, "b [d]", out=x.T, backend=backend)
    np.testing.assert_allclose(x.T, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, axes", [("b [d]", (1,)), ("[b] c [s]", (0, 2)), ("b (g [c]) [s]", (2, 3))])
def test_out_that_is_x_normalizes_in_place(backend, pattern, axes):
    x = np.random.default_rng(2).standard_normal((6, 4, 5))
    if pattern == "b [d]":
        x = x.reshape(24, 5)
    expected = _definition(x if pattern != "b (g [c]) [s]" else x.reshape(6, 2, 2, 5), axes).reshape(x.shape)
    assert normlab.normalize(x, pattern, out=x, backend=backend, **({"g": 2} if "g" in pattern else {})) is x
    np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_over_the_weight_gives_what_a_separate_out_gives(backend):
    rng = np.random.default_rng(3)
    buffer = rng.standard_normal(8 * 16)
    x = rng.standard_normal((8, 16))
    out = buffer.reshape(8, 16)
    weight = buffer[:16]  # the first row of out
    expected = _definition(x, (1,)) * weight
    normlab.normalize(x, "b [d]", weight=weight, params="d", out=out, backend=backend)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, axes", [("b [f]", (1,)), ("b (g [c])", (2,))])
def test_an_np_matrix_as_out_is_written_as_numpy_writes_it(backend, pattern, axes):
    x = np.random.default_rng(4).standard_normal((4, 6))
    out = np.matrix(np.zeros((4, 6)))
    result = normlab.normalize(x, pattern, out=out, backend=backend, **({"g": 2} if "g" in pattern else {}))
    assert result is out
    np.testing.assert_allclose(np.asarray(out), _definition(x.reshape(4, 2, 3) if "g" in pattern else x, axes)
                               .reshape(4, 6), rtol=1e-12, atol=1e-12)


# --- given statistics must broadcast to the statistics' shape -------------------------------


def test_backward_refuses_statistics_whose_size_fits_but_shape_does_not():
    x = np.random.default_rng(5).standard_normal((2, 3, 4))
    _, mean, rstd = normlab.normalize(x, "b c [s]", return_stats=True)  # shape (2, 3, 1)
    with pytest.raises(ShapeError) as info:
        normlab.normalize_backward(np.ones_like(x), x, "b c [s]", mean=mean.reshape(3, 2), rstd=rstd.reshape(3, 2))
    assert "'b c [s]'" in str(info.value) and "(2, 3, 4)" in str(info.value) and "(2, 3, 1)" in str(info.value)


def test_normalize_refuses_statistics_whose_size_fits_but_shape_does_not():
    x = np.random.default_rng(6).standard_normal((2, 3, 4))
    with pytest.raises(ShapeError, match="does not broadcast"):
        normlab.normalize(x, "b c [s]", mean=np.zeros((3, 2)), rstd=np.ones((3, 2)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 3), (1, 1, 1), ()])
def test_statistics_of_the_statistics_shape_the_kept_axes_or_a_broadcast_are_applied(backend, shape):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 4))
    mean = rng.standard_normal(shape)
    rstd = rng.uniform(0.5, 2.0, shape)
    laid_out = (lambda a: a.reshape(2, 3, 1)) if shape == (2, 3) else (lambda a: a)
    expected = (x - laid_out(mean)) * laid_out(rstd)  # the definition, in float64
    got = normlab.normalize(x, "b c [s]", mean=mean, rstd=rstd, backend=backend)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_channel_statistics_apply_to_batch_norm(backend):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 4))
    mean, rstd = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    got = normlab.normalize(x, "[b] c [s]", mean=mean, rstd=rstd, backend=backend)
    np.testing.assert_allclose(got, (x - mean[:, None]) * rstd[:, None], rtol=1e-12, atol=1e-12)


# --- masked arrays --------------------------------------------------------------------------


def test_a_masked_input_is_refused_with_how_to_fix_it():
    x = np.ma.masked_array(np.arange(12.0).reshape(3, 4), mask=np.eye(3, 4, dtype=bool))
    with pytest.raises(InputError) as info:
        normlab.normalize(x, "b [d]")
    message = str(info.value)
    assert "'b [d]'" in message and "(3, 4)" in message and "x.filled(" in message and "np.asarray(x)" in message


@pytest.mark.parametrize("call", [
    lambda x: NF.layer_norm(x, 4),
    lambda x: NF.batch_norm(x, None, None, training=True),
    lambda x: normlab.normalize_backward(x, x.data, "b [d]"),
    lambda x: normlab.normalize(x.data, "b [d]", weight=x[0], params="d"),
    lambda x: normlab.normalize(x.data, "b [d]", out=np.ma.masked_array(np.empty((3, 4)))),
    lambda x: normlab.normalize(x.data, "b [d]", mean=x[:, :1], rstd=np.ones((3, 1))),
    lambda x: normlab.normalize(x.data, "b [d]", residual=x.data, rms=True, rstd=x[:, :1]),
    lambda x: normlab.normalize(x.data, "b [d]", scale=x[:, 0], modulation="b"),
    lambda x: normlab.normalize(x.data, "b [d]", shift=x[:, 0], modulation="b"),
    lambda x: normlab.normalize_backward(x, x.data, "b [d]", residual=x.data),
    lambda x: normlab.normalize_backward(x.data, x.data, "b [d]", residual=x.data, grad_sum=x),
])
def test_masked_arrays_are_refused_wherever_they_enter(call):
    x = np.ma.masked_array(np.arange(12.0).reshape(3, 4), mask=np.eye(3, 4, dtype=bool))
    with pytest.raises(InputError, match="mask"):
        call(x)


def test_the_recipe_in_the_masked_array_error_gives_statistics_of_the_unmasked_elements():
    data = np.random.default_rng(12).standard_normal((3, 5))
    x = np.ma.masked_array(data, mask=np.eye(3, 5, dtype=bool))
    with pytest.raises(InputError) as info:
        normlab.normalize(x, "b [d]")
    assert "mask=~np.ma.getmaskarray(x)" in str(info.value)
    y = normlab.normalize(np.ma.getdata(x), "b [d]", mask=~np.ma.getmaskarray(x))
    for row in range(3):  # every element normalized with the statistics of the unmasked ones
        kept = data[row][~x.mask[row]]
        np.testing.assert_allclose(y[row], (data[row] - kept.mean()) / np.sqrt(kept.var() + 1e-5), rtol=1e-12)


def test_a_masked_array_with_nothing_masked_normalizes_as_its_data():
    x = np.ma.masked_array(np.random.default_rng(9).standard_normal((3, 4)))
    np.testing.assert_allclose(normlab.normalize(x, "b [d]"), _definition(x.data, (1,)), rtol=1e-12, atol=1e-12)


# --- clear errors in place of bare ones ------------------------------------------------------


def test_an_eps_too_large_for_a_float_is_an_input_error():
    with pytest.raises(InputError) as info:
        normlab.normalize(np.ones((2, 3)), "b [d]", eps=10**400)
    assert "'b [d]'" in str(info.value) and "(2, 3)" in str(info.value) and "1e-5" in str(info.value)


def test_an_array_as_rms_is_an_input_error():
    with pytest.raises(InputError) as info:
        normlab.normalize(np.ones((2, 3)), "b [d]", rms=np.array([True, False]))
    assert "rms must be True or False" in str(info.value) and "'b [d]'" in str(info.value)


@pytest.mark.parametrize("flag", ["yes", 2, 0.5, None])
def test_a_flag_that_is_not_a_boolean_is_an_input_error(flag):
    with pytest.raises(InputError, match="rms=True or rms=False"):
        normlab.normalize_backward(np.ones((2, 3)), np.ones((2, 3)), "b [d]", rms=flag)


def test_a_pattern_expanding_past_numpys_axis_limit_is_a_shape_error():
    limit = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
    names = " ".join(f"a{i}" for i in range(limit - 3))
    x = np.ones((2,) + (1,) * (limit - 1))  # as many axes as NumPy allows
    pattern = f"b (c0 c1 c2) {names} [z]"  # (c0 c1 c2) splits into three: limit + 2 axes
    with pytest.raises(ShapeError) as info:
        normlab.normalize(x, pattern, c0=1, c1=1)
    assert f"has {limit + 2} axes" in str(info.value) and pattern in str(info.value)


# --- flags reach the kernels as Python bools ------------------------------------------------


def test_integer_and_numpy_flags_compile_no_new_kernel_signature():
    pytest.importorskip("numba")
    from normlab.kernels import columns, fused, rows, rows_backward, segments
    from normlab.kernels._jit import Kernel

    x = np.random.default_rng(10).standard_normal((4, 8)).astype(np.float32)
    g = np.ones_like(x)
    counted = np.ones(x.shape, bool)
    kernels = [rows.row_forward, rows.row_backward, rows_backward.row_backward32, columns.channels_last_stats,
               fused.fused_row_forward_32]
    kernels += [k for k in vars(segments).values() if isinstance(k, Kernel)]

    def run(flag):
        normlab.normalize(x, "b [d]", rms=flag, backend="numba")
        normlab.normalize_backward(g, x, "b [d]", rms=flag, backend="numba")
        normlab.normalize(x, "[b] d", rms=flag, backend="numba")
        normlab.normalize(x, "b [d]", rms=flag, residual=x, backend="numba")
        normlab.normalize(x, "b [d]", rms=flag, mask=counted, backend="numba")
        normlab.normalize_backward(g, x, "b [d]", rms=flag, mask=counted, backend="numba")

    run(True)  # warm: whatever compiles compiles here
    before = [len(k.serial.signatures) for k in kernels]
    for flag in (np.True_, 1, np.int64(1), np.uint8(1), np.array(True), np.False_, 0):
        run(flag)
    assert [len(k.serial.signatures) for k in kernels] == before

