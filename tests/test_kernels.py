"""The fused kernels against the NumPy reference and PyTorch: values, statistics,
gradients, the exactness claims, NaN isolation, determinism across thread counts, out=.

Oracles are ``backend="numpy"`` and torch, never the kernels themselves.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normlab
from normlab import kernels
from normlab.plan import make_plan

numba = pytest.importorskip("numba")
try:
    import torch
    F = torch.nn.functional
except ImportError:  # the reference comparisons still run
    torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is the oracle here")

# |kernel − reference| allowed per dtype: both round one float64 result, the sums differ in order
TOLERANCE = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-10}


def _close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype] * scale
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


# --- random patterns -------------------------------------------------------------------

@st.composite
def pattern_cases(draw):
    """A pattern over 1-4 axes with random reduced axes, an input of random size, dtype,
    strides and (sometimes) parameters over the kept run or some reduced axes."""
    ndim = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    reduced = draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim).filter(any))
    names = [f"a{i}" for i in range(ndim)]
    parts = [f"[{n}]" if r else n for n, r in zip(names, reduced)]
    pattern = " ".join(parts)
    kind = draw(st.sampled_from(["none", "kept", "reduced", "all"]))
    if kind == "kept" and not all(reduced):
        params = [n for n, r in zip(names, reduced) if not r]
    elif kind == "reduced":
        params = [n for n, r in zip(names, reduced) if r][-1:]
    elif kind == "all":
        params = names
    else:
        params = []
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    strided = draw(st.booleans())
    rms = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return pattern, tuple(sizes), " ".join(params) or None, dtype, strided, rms, seed


def _inputs(shape, dtype, strided, seed):
    rng = np.random.default_rng(seed)
    if strided:  # every other element of a larger array: not contiguous
        big = rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dtype)
        x = big[..., ::2]
    else:
        x = rng.standard_normal(shape).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype), rng


@given(pattern_cases())
def test_kernel_forward_matches_reference_on_random_patterns(case):
    pattern, shape, params, dtype, strided, rms, seed = case
    x, _, rng = _inputs(shape, dtype, strided, seed)
    x_before = x.copy()
    plan = make_plan(pattern, shape, params)
    weight = bias = None
    if params:
        weight = rng.uniform(0.5, 1.5, plan.param_shape)
        bias = rng.standard_normal(plan.param_shape)
    y, mean, rstd = normlab.normalize(x, pattern, weight=weight, bias=bias, params=params, rms=rms,
                                      return_stats=True, backend="numba")
    y_ref, mean_ref, rstd_ref = normlab.normalize(x, pattern, weight=weight, bias=bias, params=params, rms=rms,
                                                  return_stats=True, backend="numpy")
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    # near-constant groups (tiny variance) amplify ulp differences; scale by the largest rstd
    scale = float(np.nanmax(rstd_ref, initial=1.0)) / 10 + 1
    _close(y, y_ref, dtype, scale)
    _close(rstd, rstd_ref, np.float64, 1e3 * scale)
    assert (mean is None) == (mean_ref is None) == rms
    if mean is not None:
        _close(mean, mean_ref, np.float64, 1e3)
    np.testing.assert_array_equal(x, x_before)


@given(pattern_cases())
def test_kernel_backward_matches_reference_on_random_patterns(case):
    pattern, shape, params, dtype, strided, rms, seed = case
    x, grad_y, rng = _inputs(shape, dtype, strided, seed)
    plan = make_plan(pattern, shape, params)
    weight = rng.uniform(0.5, 1.5, plan.param_shape) if params else None
    got = normlab.normalize_backward(grad_y, x, pattern, weight=weight, params=params, rms=rms, backend="numba")
    want = normlab.normalize_backward(grad_y, x, pattern, weight=weight, params=params, rms=rms, backend="numpy")
    rstd = normlab.normalize(x, pattern, rms=rms, return_stats=True, backend="numpy")[2]
    scale = float(np.nanmax(rstd, initial=1.0)) ** 2 + plan.group_size
    for mine, theirs in zip(got, want):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
            _close(mine, theirs, dtype, scale)


@pytest.mark.parametrize("pattern,shape,params", [
    ("a b [c]", (3, 4, 5), "a"),            # parameters over the outer kept axis: row stride 4
    ("a b [c d]", (3, 2, 4, 5), "b c"),     # kept and reduced blocks at once
    ("a [c d e]", (2, 3, 4, 5), "d"),       # a middle reduced axis: repeats and an inner stride
    ("a [c d]", (2, 3, 4), "d c"),          # params in another order than the pattern
])
def test_parameter_layouts_off_the_presets_match_the_reference(pattern, shape, params):
    rng = np.random.default_rng(14)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(shape)
    plan = make_plan(pattern, shape, params)
    assert isinstance(kernels.canonical_view(plan), kernels.RowView)
    w, b = rng.standard_normal(plan.param_shape), rng.standard_normal(plan.param_shape)
    for backend_result, reference_result in zip(
        (normlab.normalize(x, pattern, weight=w, bias=b, params=params, backend="numba"),
         *normlab.normalize_backward(gy, x, pattern, weight=w, params=params, backend="numba")),
        (normlab.normalize(x, pattern, weight=w, bias=b, params=params, backend="numpy"),
         *normlab.normalize_backward(gy, x, pattern, weight=w, params=params, backend="numpy")),
    ):
        np.testing.assert_allclose(backend_result, reference_result, rtol=1e-10, atol=1e-10)


def test_canonical_views_cover_every_preset():
    cases = {
        ("b t [d]", (2, 3, 8), "d"): kernels.RowView,
        ("b [c h w]", (2, 3, 4, 4), "c"): kernels.RowView,
        ("b c [h w]", (2, 3, 4, 4), "c"): kernels.RowView,
        ("b (g [c]) [h w]", (2, 6, 4, 4), "(g c)"): kernels.RowView,
        ("[b] c [h w]", (2, 3, 4, 4), "c"): kernels.ColumnView,
        ("[b h w] c", (2, 4, 4, 3), "c"): kernels.ColumnView,
    }
    for (pattern, shape, params), family in cases.items():
        view = kernels.canonical_view(make_plan(pattern, shape, params, **({"g": 3} if "g" in pattern else {})))
        assert isinstance(view, family), pattern


def test_kept_axes_between_reduced_ones_run_on_a_transposed_copy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    pattern, params = "a [b] c [d]", "b c"
    plan = make_plan(pattern, x.shape, params)
    assert kernels.canonical_view(plan).order == (0, 2, 1, 3)
    w, b = rng.standard_normal(plan.param_shape), rng.standard_normal(plan.param_shape)
    y, mean, rstd = normlab.normalize(x, pattern, weight=w, bias=b, params=params, return_stats=True,
                                      backend="numba")
    y_ref, mean_ref, rstd_ref = normlab.normalize(x, pattern, weight=w, bias=b, params=params, return_stats=True,
                                                  backend="numpy")
    _close(y, y_ref, np.float32)
    _close(mean, mean_ref, np.float64, 1e3)
    _close(rstd, rstd_ref, np.float64, 1e3)
    for mine, theirs in zip(normlab.normalize_backward(gy, x, pattern, weight=w, params=params, backend="numba"),
                            normlab.normalize_backward(gy, x, pattern, weight=w, params=params, backend="numpy")):
        _close(mine, theirs, np.float32, 10)


def test_parameters_no_table_describes_fall_back_to_the_reference():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    w = np.arange(1.0, 9.0).reshape(2, 4)
    plan = make_plan("a b c [d]", x.shape, "a c")  # kept axes a and c are not adjacent
    assert kernels.canonical_view(plan) is None
    np.testing.assert_array_equal(normlab.normalize(x, "a b c [d]", weight=w, params="a c", backend="numba"),
                                  normlab.normalize(x, "a b c [d]", weight=w, params="a c", backend="numpy"))


# --- PyTorch parity through the kernel path --------------------------------------------

def _torch(array, grad=False):
    return torch.tensor(array, requires_grad=grad)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_and_its_gradients_match_torch(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5, 32)).astype(dtype)
    w, b = rng.standard_normal(32).astype(dtype), rng.standard_normal(32).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    xt, wt, bt = _torch(x, True), _torch(w, True), _torch(b, True)
    yt = F.layer_norm(xt, (32,), wt, bt)
    yt.backward(torch.tensor(gy))
    y = normlab.normalize(x, "b t [d]", weight=w, bias=b, params="d", backend="numba")
    gx, gw, gb = normlab.normalize_backward(gy, x, "b t [d]", weight=w, params="d", backend="numba")
    scale = 10 if dtype == np.float32 else 1e3
    _close(y, yt.detach().numpy(), dtype, scale)
    _close(gx, xt.grad.numpy(), dtype, scale)
    _close(gw, wt.grad.numpy(), dtype, scale * 10)
    _close(gb, bt.grad.numpy(), dtype, scale * 10)


@needs_torch
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_training_and_its_gradients_match_torch(channels_last):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 5, 6, 7))
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    gy = rng.standard_normal(x.shape)
    xt, wt, bt = _torch(x, True), _torch(w, True), _torch(b, True)
    yt = F.batch_norm(xt, None, None, wt, bt, training=True)
    yt.backward(torch.tensor(gy))
    if channels_last:  # the same numbers, laid out (n, h, w, c)
        moved = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        y = np.moveaxis(normlab.normalize(moved, "[n h w] c", weight=w, bias=b, params="c", backend="numba"), -1, 1)
        gx, gw, gb = normlab.normalize_backward(np.moveaxis(gy, 1, -1), moved, "[n h w] c", weight=w, params="c",
                                                backend="numba")
        gx = np.moveaxis(gx, -1, 1)
    else:
        y = normlab.normalize(x, "[n] c [h w]", weight=w, bias=b, params="c", backend="numba")
        gx, gw, gb = normlab.normalize_backward(gy, x, "[n] c [h w]", weight=w, params="c", backend="numba")
    for mine, theirs in ((y, yt), (gx, xt.grad), (gw, wt.grad), (gb, bt.grad)):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-9, atol=1e-9)


@needs_torch
def test_group_norm_and_its_gradients_match_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 12, 5, 5)).astype(np.float32)
    w, b = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    xt, wt, bt = _torch(x, True), _torch(w, True), _torch(b, True)
    yt = F.group_norm(xt, 4, wt, bt)
    yt.backward(torch.tensor(gy))
    pattern = "n (g [c]) [h w]"
    y = normlab.normalize(x, pattern, g=4, weight=w, bias=b, params="(g c)", backend="numba")
    gx, gw, gb = normlab.normalize_backward(gy, x, pattern, g=4, weight=w, params="(g c)", backend="numba")
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


@needs_torch
def test_rms_norm_and_its_gradients_match_torch():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((7, 48))
    w = rng.standard_normal(48)
    gy = rng.standard_normal(x.shape)
    xt, wt = _torch(x, True), _torch(w, True)
    yt = F.rms_norm(xt, (48,), wt, eps=1e-6)
    yt.backward(torch.tensor(gy))
    y = normlab.normalize(x, "b [d]", weight=w, params="d", rms=True, eps=1e-6, backend="numba")
    gx, gw, _ = normlab.normalize_backward(gy, x, "b [d]", weight=w, params="d", rms=True, eps=1e-6,
                                           backend="numba")
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)


@needs_torch
def test_functional_presets_run_on_the_kernels_by_default_and_match_torch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, 9)).astype(np.float32)
    assert normlab.core._resolve_backend(None, x.dtype) == "numba"
    np.testing.assert_allclose(normlab.functional.instance_norm(x), F.instance_norm(torch.tensor(x)).numpy(),
                               rtol=1e-5, atol=1e-5)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    trm, trv = torch.zeros(6), torch.ones(6)
    y = normlab.functional.batch_norm(x, rm, rv, training=True)
    yt = F.batch_norm(torch.tensor(x), trm, trv, training=True)
    np.testing.assert_allclose(y, yt.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-5)
    np.testing.assert_allclose(normlab.functional.batch_norm(x, rm, rv), F.batch_norm(torch.tensor(x), trm, trv).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern,shape", [("[b] c [s]", (40, 3, 1000)), ("[b] c", (20000, 3))])
def test_batch_norm_statistics_merged_over_many_chunks_match_the_reference(pattern, shape):
    # offset data: a wrong merge (or E[x²]−E[x]²) would lose the variance to cancellation
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) * np.array([1.0, 0.01, 5.0]).reshape((3,) + (1,) * (len(shape) - 2))
         + 1000.0).astype(np.float32)
    plan = make_plan(pattern, shape)
    view = kernels.canonical_view(plan)
    assert view.outer * view.inner > kernels.CHUNK_ELEMENTS  # several chunks per channel
    _, stats = normlab.core.normalize_with_stats(x, pattern, backend="numba")
    _, expected = normlab.core.normalize_with_stats(x, pattern, backend="numpy")
    np.testing.assert_allclose(stats.mean, expected.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.var, expected.var, rtol=1e-9)


@pytest.mark.parametrize("pattern,shape", [("b [d]", (3, 4096)), ("[b] d", (4096, 3))])
def test_a_huge_common_offset_costs_no_precision_forward_or_backward(pattern, shape):
    # the shift by the first element must survive compilation: no rewrite to Σx − n·shift
    rng = np.random.default_rng(13)
    x = 1e9 + rng.standard_normal(shape)
    gy = rng.standard_normal(shape)
    np.testing.assert_allclose(normlab.normalize(x, pattern, backend="numba"),
                               normlab.normalize(x, pattern, backend="numpy"), rtol=0, atol=1e-12)
    np.testing.assert_allclose(normlab.normalize_backward(gy, x, pattern, backend="numba")[0],
                               normlab.normalize_backward(gy, x, pattern, backend="numpy")[0], rtol=0, atol=1e-12)


# --- the exactness claims on the kernel path ---------------------------------------------

@pytest.mark.parametrize("pattern,shape", [("b [d]", (3, 257)), ("[b] c [h w]", (40, 2, 32, 32)),
                                           ("[b] c", (5000, 3))])
def test_constant_group_normalizes_to_exact_zero_and_affine_gives_exactly_bias(pattern, shape):
    # the batch-norm shapes span several chunks, so Chan's merge is exercised too
    x = np.full(shape, 1e6 + 0.25, np.float32)
    assert not np.any(normlab.normalize(x, pattern, backend="numba"))
    channel = shape[1] if pattern.startswith("[b]") else shape[-1]
    params = "c" if pattern.startswith("[b]") else "d"
    bias = np.arange(channel, dtype=np.float32)
    y = normlab.normalize(x, pattern, weight=np.full(channel, 3.0, np.float32), bias=bias, params=params,
                          backend="numba")
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape((channel,) + (1,) * (len(shape) - 2 if
                                  pattern.startswith("[b] c [") else 0)), shape))


@pytest.mark.parametrize("pattern", ["b [f]", "[f] b"])
def test_middle_of_symmetric_group_is_exactly_zero_and_equal_inputs_give_equal_outputs(pattern):
    row = np.array([4, 3, 2, 3], np.float32)
    x = row[None, :] if pattern == "b [f]" else row[:, None]
    y = normlab.normalize(x, pattern, backend="numba").ravel()
    assert y[1] == 0.0 and y[3] == 0.0
    assert y[0] == -y[2]


def test_nan_poisons_only_its_own_group():
    rng = np.random.default_rng(6)
    for pattern, shape, poisoned in (("b [d]", (4, 300), (1, 7)), ("[b] c [s]", (300, 4, 3), (10, 2, 1)),
                                     ("[b] c", (70000, 3), (5, 1))):
        x = rng.standard_normal(shape).astype(np.float32)
        x[poisoned] = np.nan
        y = normlab.normalize(x, pattern, backend="numba")
        bad = np.isnan(y)
        group = normlab.make_plan(pattern, shape).group_ids()
        assert np.all(bad == (group == group[poisoned])), pattern


# --- determinism, the small-input path, out= ---------------------------------------------

def _with_threads(count, fn):
    before = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("pattern,shape,params,sizes", [
    ("b [d]", (300, 256), "d", {}),
    ("b (g [c]) [s]", (8, 8, 1024), "(g c)", {"g": 4}),
    ("[b] c [s]", (48, 3, 1000), "c", {}),
    ("[b] c", (30000, 5), "c", {}),
])
def test_results_are_bit_identical_on_one_and_two_threads(pattern, shape, params, sizes, every_call_threaded):
    # float64 throughout: a float32 result would round away a changed order of addition
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape) * 3 + 100
    gy = rng.standard_normal(shape)
    plan = make_plan(pattern, shape, params, **sizes)
    w = rng.standard_normal(plan.param_shape)

    def run():
        y, mean, rstd = normlab.normalize(x, pattern, weight=w, bias=w, params=params, return_stats=True,
                                          backend="numba", **sizes)
        grads = normlab.normalize_backward(gy, x, pattern, weight=w, params=params, backend="numba", **sizes)
        return (y, mean, rstd) + grads

    for one, two in zip(_with_threads(1, run), _with_threads(2, run)):
        assert one.tobytes() == two.tobytes()


def test_small_input_takes_the_serial_path_with_the_same_bits():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    assert x.size < kernels.SERIAL_BELOW
    prepared = normlab.core.prepare(x, "b [d]", None, None, None, {})
    from normlab.kernels.rows import row_forward

    ones, zeros = np.ones((1, 1)), np.zeros((1, 1))
    results = []
    for serial in (True, False):
        y = np.empty_like(x)
        stats = [np.empty(4) for _ in range(3)]
        row_forward(np.ascontiguousarray(prepared.x), (1, 0, 0), y, (1, 0, 0), 64, ones, zeros, 1, 64, False, 1e-5,
                    False, *stats, serial=serial)
        results.append(y.tobytes())
    assert results[0] == results[1]


def test_strided_inputs_compile_at_most_one_more_signature_and_repeated_calls_none():
    """A contiguous array is one kernel signature; every strided one (read in place or
    copied) shares at most one more, whatever its strides."""
    from normlab.kernels.rows import row_forward32 as row_forward  # float32 rows

    rng = np.random.default_rng(9)
    base = rng.standard_normal((6, 40)).astype(np.float32)
    normlab.normalize(base, "b [d]", backend="numba")
    before = len(row_forward.serial.signatures)
    for strided in (base[:, ::2], base[::2], base.T.copy().T, base[:, :20], base[::3, 10:30]):
        normlab.normalize(strided, "b [d]", backend="numba")
    after = len(row_forward.serial.signatures)
    assert after <= before + 1
    for strided in (base[::2, :8], base[1:, 2:], base[:, ::4]):
        normlab.normalize(strided, "b [d]", backend="numba")
    assert len(row_forward.serial.signatures) == after


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_out_receives_the_result_in_place(dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 33)).astype(dtype)
    expected = normlab.normalize(x, "b [d]", backend="numpy")
    out = np.full_like(x, 7)
    returned = normlab.normalize(x, "b [d]", out=out, backend="numba")
    assert returned is out
    _close(out, expected, dtype)
    strided_out = np.full((5, 66), 7, dtype)[:, ::2]
    normlab.normalize(x, "b [d]", out=strided_out, backend="numba")
    _close(strided_out, expected, dtype)


def _reshape_of_numpy_before_2_1(a, newshape, order="C"):
    """np.reshape as NumPy 1.24 to 2.0 define it: no copy= keyword."""
    return a.reshape(newshape, order=order)


def test_out_and_the_row_backward_run_on_a_numpy_whose_reshape_takes_no_copy(monkeypatch):
    """pyproject.toml admits NumPy 1.24; np.reshape(..., copy=False) is NumPy 2.1's, and
    normalize(out=) and normalize_backward raised TypeError on older NumPy."""
    monkeypatch.setattr(np, "reshape", _reshape_of_numpy_before_2_1)
    x = np.random.default_rng(12).standard_normal((5, 33))
    expected = normlab.normalize(x, "b [d]", backend="numpy")
    strided_out = np.full((5, 66), 7.0)[:, ::2]
    normlab.normalize(x, "b [d]", out=strided_out, backend="numba")
    _close(strided_out, expected, np.float64)
    strided_grad = np.ones((5, 66))[:, ::2]
    got = normlab.normalize_backward(strided_grad, x, "b [d]", backend="numba")
    want = normlab.normalize_backward(strided_grad, x, "b [d]", backend="numpy")
    _close(got[0], want[0], np.float64)


def test_given_statistics_are_applied_as_in_evaluation():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    mean, rstd = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    got = normlab.normalize(x, "[b] c [s]", mean=mean, rstd=rstd, backend="numba")
    want = normlab.normalize(x, "[b] c [s]", mean=mean, rstd=rstd, backend="numpy")
    _close(got, want, np.float32)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(normlab.NormlabError, match="backend must be one of auto, numba, numpy"):
        normlab.normalize(np.ones((2, 3)), "b [f]", backend="cuda")


def test_importing_normlab_neither_imports_numba_nor_compiles():
    code = "import sys, normlab; normlab.normalize([[1.0, 2.0]], 'b [f]', backend='numpy'); print('numba' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
