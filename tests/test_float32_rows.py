"""The float32 arithmetic of the row kernels (layer, group, instance and RMS norm on
float32 input) keeps the numerics contract. Oracle: a float64 normalization written
here from the definition (mean, biased variance, rstd = 1/sqrt(var + eps)), and
hypothesis properties; none of it calls normlab's own math."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normlab

pytest.importorskip("numba")


def definition(x: np.ndarray, eps: float, rms: bool = False) -> np.ndarray:
    """Rows of ``x`` normalized in float64, straight from the formula."""
    x64 = x.astype(np.float64)
    if rms:
        return x64 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + eps)
    mean = x64.mean(axis=1, keepdims=True)
    var = np.mean((x64 - mean) ** 2, axis=1, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


rows_of = st.tuples(st.integers(1, 6), st.integers(2, 700))


@settings(max_examples=60, deadline=None)
@given(rows_of, st.sampled_from([0.0, 1e2, 1e4, 1e6]), st.floats(1e-6, 1e6), st.integers(0, 2**32 - 1),
       st.booleans())
def test_float32_rows_stay_within_1e_4_of_the_float64_definition(shape, offset_over_std, std, seed, rms):
    rng = np.random.default_rng(seed)
    offset = 0.0 if rms else offset_over_std * std
    x = (offset + std * rng.standard_normal(shape)).astype(np.float32)
    assume(np.all(np.ptp(x, axis=1) > 0))
    y = normlab.normalize(x, "b [d]", eps=0.0, rms=rms)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, definition(x, 0.0, rms), rtol=0, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 500), st.sampled_from([1e-39, 1e-25, 1e-12, 1e12, 1e25, 1e37]), st.integers(0, 2**32 - 1))
def test_float32_rows_of_extreme_scale_still_normalize(n, std, seed):
    """Squares of such values underflow or overflow in float32: rstd outside float32's
    comfortable range sends the row through float64."""
    x = (std * np.random.default_rng(seed).standard_normal((2, n))).astype(np.float32)
    assume(np.all(np.ptp(x, axis=1) > 0))
    np.testing.assert_allclose(normlab.normalize(x, "b [d]", eps=0.0), definition(x, 0.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [3, 100, 4096])
def test_a_far_outlier_in_the_first_place_costs_no_precision(n):
    """The shift is the first element; here it sits √n standard deviations away."""
    x = np.random.default_rng(3).standard_normal((2, n)).astype(np.float32)
    x[:, 0] = 1e7
    np.testing.assert_allclose(normlab.normalize(x, "b [d]", eps=0.0), definition(x, 0.0), rtol=0, atol=1e-4)


@settings(max_examples=80, deadline=None)
@given(st.integers(-2**20, 2**20), st.lists(st.integers(1, 2**20), min_size=1, max_size=8), st.integers(-30, 30),
       st.randoms(use_true_random=False), st.floats(0.25, 4.0, width=32))
def test_the_middle_of_a_symmetric_float32_row_is_exactly_zero(center, steps, exponent, random, weight):
    # integers below 2^21 times a power of two: every value and every difference is exact
    values = [center] + [center + s for s in steps] + [center - s for s in steps]
    x = np.ldexp(np.array(values, np.float64), exponent).astype(np.float32)
    order = list(range(len(values)))
    random.shuffle(order)
    middle = order.index(0)
    shuffled = x[order][None]
    assert normlab.normalize(shuffled, "b [d]")[0, middle] == 0
    w = np.full(len(values), weight, np.float32)
    b = np.linspace(-1, 1, len(values)).astype(np.float32)
    assert normlab.normalize(shuffled, "b [d]", weight=w, bias=b, params="d")[0, middle] == b[middle]


@given(st.floats(-2.0**100, 2.0**100, width=32), st.integers(1, 600), st.booleans())
def test_a_constant_float32_row_gives_exact_zeros_and_exactly_the_bias(value, n, grouped):
    x = np.full((3, n * 2), value, np.float32)
    x[1] = np.float32(1.5)
    pattern, params, sizes = ("b (g [c])", "(g c)", {"g": 2}) if grouped else ("b [d]", "d", {})
    assert np.all(normlab.normalize(x, pattern, **sizes) == 0)
    bias = np.random.default_rng(n).standard_normal(2 * n).astype(np.float32)
    y = normlab.normalize(x, pattern, weight=np.full(2 * n, 3.0, np.float32), bias=bias, params=params, **sizes)
    assert np.array_equal(y, np.broadcast_to(bias, y.shape))


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_nan_in_a_float32_row_stays_in_that_row(poison):
    x = np.random.default_rng(4).standard_normal((4, 300)).astype(np.float32) + 1e3
    clean = normlab.normalize(x, "b [d]")
    x[2, 17] = poison
    y = normlab.normalize(x, "b [d]")
    assert np.all(np.isnan(y[2]))
    np.testing.assert_array_equal(np.delete(y, 2, axis=0), np.delete(clean, 2, axis=0))


def test_float32_group_norm_matches_the_float64_definition_per_group():
    x = (50 + 3 * np.random.default_rng(5).standard_normal((4, 8, 33))).astype(np.float32)
    y = normlab.normalize(x, "b (g [c]) [s]", g=4, eps=0.0)
    expected = definition(x.reshape(16, -1), 0.0).reshape(x.shape)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-4)


def test_float32_rows_are_bit_identical_on_one_and_two_threads(every_call_threaded):
    numba = pytest.importorskip("numba")
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")

    x = (7 + np.random.default_rng(6).standard_normal((300, 513))).astype(np.float32)
    w = np.random.default_rng(7).standard_normal(513).astype(np.float32)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(normlab.normalize(x, "b [d]", weight=w, bias=w, params="d").tobytes())
    finally:
        numba.set_num_threads(before)
    assert results[0] == results[1]


@pytest.mark.parametrize("rms", [False, True])
def test_float32_backward_of_gradients_near_float32s_largest_matches_float64(rms):
    """Output gradients of 5e36 with the sign of x̂: a row's Σ g·x̂ passes float32's largest,
    though grad_x itself does not. Oracle: the float64 backward written here from the
    definition, grad_x = rstd·(g − mean(g) − x̂·mean(g·x̂)) (RMS: no mean(g) term)."""
    rng = np.random.default_rng(15)
    x = rng.standard_normal((8, 4096)).astype(np.float32)
    grad_y = (np.sign(x) * 5e36 * (0.5 + rng.random(x.shape))).astype(np.float32)
    x64, g64 = x.astype(np.float64), grad_y.astype(np.float64)
    x_hat = definition(x, 1e-5, rms)
    centered = 0.0 if rms else x64.mean(axis=1, keepdims=True)
    rstd = x_hat[:, :1] / (x64[:, :1] - centered)
    expected = rstd * (g64 - (0.0 if rms else g64.mean(axis=1, keepdims=True))
                       - x_hat * (g64 * x_hat).mean(axis=1, keepdims=True))
    got = normlab.normalize_backward(grad_y, x, "b [d]", rms=rms)[0]
    assert np.isfinite(expected.astype(np.float32)).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

