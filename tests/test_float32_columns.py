"""Batch norm keeps the numerics contract with its one-pass statistics and float32 apply,
channels-last ((rows, C), BatchNorm1d's (N, C) input among them) and channels-first
((N, C, S)). Each test builds its data as columns of a (values, C) matrix and runs it
in both layouts. Oracles: a float64 batch norm written here from the definition (mean,
biased variance, rstd = 1/sqrt(var + eps)), torch's float64 autograd, and hypothesis
properties; none of it calls normlab's own math."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import normlab

numba = pytest.importorskip("numba")
torch = pytest.importorskip("torch")

from normlab import kernels  # noqa: E402


def definition(x: np.ndarray, eps: float) -> np.ndarray:
    """Columns of ``x`` normalized in float64, straight from the formula."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0, keepdims=True)
    var = np.mean((x64 - mean) ** 2, axis=0, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


# shapes with several row groups and channel blocks (see kernels.column_group_rows)
SHAPES = [(2, 3), (5, 7), (130, 33), (301, 1030), (2000, 40)]
LAYOUTS = ["last", "first"]


def normalize_columns(x: np.ndarray, layout: str, **kwargs) -> np.ndarray:
    """normlab's batch norm of the columns of ``x`` (values, C): as it is ("[b] c"), or
    laid out channels-first as (N, C, S) with S = 2 where the count is even."""
    if layout == "last":
        return normlab.normalize(x, "[b] c", **kwargs)
    spatial = 2 if x.shape[0] % 2 == 0 else 1
    first = np.ascontiguousarray(x.reshape(-1, spatial, x.shape[1]).transpose(0, 2, 1))
    y = normlab.normalize(first, "[b] c [s]", **kwargs)
    return y.transpose(0, 2, 1).reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SHAPES), st.sampled_from([0.0, 1e2, 1e4, 1e6]), st.floats(1e-6, 1e6),
       st.integers(0, 2**32 - 1), st.sampled_from(LAYOUTS))
def test_float32_columns_stay_within_1e_4_of_the_float64_definition(shape, offset_over_std, std, seed, layout):
    rng = np.random.default_rng(seed)
    x = (offset_over_std * std + std * rng.standard_normal(shape)).astype(np.float32)
    assume(np.all(np.ptp(x, axis=0) > 0))
    y = normalize_columns(x, layout, eps=0.0)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, definition(x, 0.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [3, 100, 5000])
def test_a_far_outlier_in_the_first_row_costs_no_precision(rows, layout):
    """The shift is each channel's first value; here it sits far from the others, so the
    one-pass variance cancels and the channel takes the two-pass variance."""
    x = (1e3 + np.random.default_rng(3).standard_normal((rows, 6))).astype(np.float32)
    x[0, ::2] = 1e7  # every other channel: the others keep the one-pass variance
    np.testing.assert_allclose(normalize_columns(x, layout, eps=0.0), definition(x, 0.0), rtol=0, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 300), st.sampled_from([1e-39, 1e-25, 1e-12, 1e12, 1e25, 1e37]), st.integers(0, 2**32 - 1),
       st.sampled_from(LAYOUTS))
def test_float32_columns_of_extreme_scale_still_normalize(rows, std, seed, layout):
    """rstd outside float32's comfortable range sends the apply through float64."""
    x = (std * np.random.default_rng(seed).standard_normal((rows, 3))).astype(np.float32)
    assume(np.all(np.ptp(x, axis=0) > 0))
    np.testing.assert_allclose(normalize_columns(x, layout, eps=0.0), definition(x, 0.0), rtol=0, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.integers(-2**20, 2**20), st.lists(st.integers(1, 2**20), min_size=1, max_size=40), st.integers(-30, 30),
       st.randoms(use_true_random=False), st.floats(0.25, 4.0, width=32), st.sampled_from(LAYOUTS))
def test_the_middle_of_a_symmetric_float32_column_is_exactly_zero(center, steps, exponent, random, weight, layout):
    # integers below 2^21 times a power of two: every value and every difference is exact
    values = [center] + [center + s for s in steps] + [center - s for s in steps]
    column = np.ldexp(np.array(values, np.float64), exponent).astype(np.float32)
    order = list(range(len(values)))
    random.shuffle(order)
    middle = order.index(0)
    x = np.stack([column[order], np.arange(len(values), dtype=np.float32)], axis=1)
    assert normalize_columns(x, layout)[middle, 0] == 0
    w = np.array([weight, 1.0], np.float32)
    b = np.array([0.75, -2.0], np.float32)
    assert normalize_columns(x, layout, weight=w, bias=b, params="c")[middle, 0] == b[0]


@given(st.floats(-2.0**100, 2.0**100, width=32), st.integers(2, 700), st.sampled_from(LAYOUTS))
def test_a_constant_float32_column_gives_exact_zeros_and_exactly_the_bias(value, rows, layout):
    x = np.random.default_rng(rows).standard_normal((rows, 5)).astype(np.float32)
    x[:, 1] = value
    x[:, 3] = value
    assert np.all(normalize_columns(x, layout)[:, [1, 3]] == 0)
    bias = np.random.default_rng(rows + 1).standard_normal(5).astype(np.float32)
    y = normalize_columns(x, layout, weight=np.full(5, 3.0, np.float32), bias=bias, params="c")
    assert np.all(y[:, 1] == bias[1]) and np.all(y[:, 3] == bias[3])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("shape", [(40, 6), (700, 1500)])
def test_nan_in_a_float32_column_stays_in_that_column(poison, shape, layout):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32) + 1e3
    clean = normalize_columns(x, layout)
    x[shape[0] // 2, 3] = poison
    y = normalize_columns(x, layout)
    assert np.all(np.isnan(y[:, 3]))
    np.testing.assert_array_equal(np.delete(y, 3, axis=1), np.delete(clean, 3, axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_columns_and_their_gradients_match_torch_in_float64(dtype):
    """Several row groups and channel blocks: their partial sums must add up to torch's."""
    rng = np.random.default_rng(5)
    shape = (301, 1030)
    x = (5 + 2 * rng.standard_normal(shape)).astype(dtype)
    w, b = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    xt, wt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True)
    yt.backward(torch.tensor(gy, dtype=torch.float64))
    y = normlab.normalize(x, "[b] c", weight=w, bias=b, params="c")
    gx, gw, gb = normlab.normalize_backward(gy, x, "[b] c", weight=w, params="c")
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for mine, theirs in ((y, yt), (gx, xt.grad), (gw, wt.grad), (gb, bt.grad)):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=tol, atol=tol)


def test_float32_columns_are_bit_identical_on_one_and_two_threads(monkeypatch, every_call_threaded):
    from normlab.kernels import threads

    if threads.for_call() < 2:
        pytest.skip("needs 2 threads")
    rng = np.random.default_rng(6)
    x = (7 + rng.standard_normal((700, 1500))).astype(np.float32)
    x[0, 10] = 1e6
    gy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(1500).astype(np.float32)
    results = []
    for count in (1, 2):  # (through normlab's own cap: numba.set_num_threads would start Numba's pool)
        monkeypatch.setattr(threads, "_limit", lambda: count)
        for layout in LAYOUTS:
            y = normalize_columns(x, layout, weight=w, bias=w, params="c")
            results.append(y.tobytes())
        y, mean, rstd = normlab.normalize(x, "[b] c", weight=w, bias=w, params="c", return_stats=True)
        grads = normlab.normalize_backward(gy, x, "[b] c", weight=w, params="c", mean=mean, rstd=rstd)
        results.append(b"".join(a.tobytes() for a in (y, mean, rstd) + grads))
    assert results[:3] == results[3:]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_past_the_cancellation_threshold_take_the_two_pass_variance(dtype, layout):
    """The one-pass variance cancels past columns.CANCELLATION only for more than 1e8
    values per channel (its loss factor 1 + K² is at most their count), so the threshold
    is lowered here: 0 sends every channel whose shift is not its mean through the
    second pass."""
    from normlab.kernels import columns

    rng = np.random.default_rng(8)
    x = (1e4 + rng.standard_normal((300, 2100))).astype(dtype)
    x[:, 5] = 2.5  # a constant channel stays on the one-pass variance: exactly 0
    x[0, 7] = 1e5

    def stats(serial):
        out = np.empty((3, x.shape[1]))
        if layout == "last":
            columns.channels_last_stats(x, False, 1e-5, 0.0, kernels.column_group_rows(x.shape[1]),
                                        kernels.CHANNEL_BLOCK, kernels.column_parts(*x.shape), *out, serial=serial)
        else:  # (150, C, 2), in chunks of 16 outer indices
            first = np.ascontiguousarray(x.reshape(150, 2, -1).transpose(0, 2, 1))
            columns.channels_first_stats(first, False, 1e-5, 0.0, 16, np.empty((4, 10, x.shape[1])), *out,
                                         serial=serial)
        return out

    mean, var, rstd = stats(serial=True)
    x64 = x.astype(np.float64)
    want_var = np.mean((x64 - x64.mean(axis=0)) ** 2, axis=0)
    np.testing.assert_allclose(var, want_var, rtol=1e-12)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-13)
    assert var[5] == 0 and mean[5] == 2.5
    # the threaded variant (two threads where there are two) agrees bit for bit
    assert stats(serial=False).tobytes() == np.stack([mean, var, rstd]).tobytes()
