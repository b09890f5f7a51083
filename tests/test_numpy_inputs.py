"""Inputs of the NumPy API that users hand it and that it once mishandled: a mean given
with ``rms=True``, segment ids far beyond the input's size, and more.

Oracles: float64 definitions written here (per-segment instance norm), the contract that
bad input raises a ``normlab.errors`` error repeating the pattern and the shape and saying
how to fix it, and hypothesis properties.
"""

import re

import numpy as np
import pytest

import normlab
from normlab.errors import InputError, NormlabError, ShapeError

BACKENDS = ["numba", "numpy"]


def _per_segment(x, ids, num_segments, eps=1e-5):
    """Instance norm of each segment of rows of ``x`` (float64): y, and mean and rstd per
    segment (0 for a segment with no rows)."""
    x = np.asarray(x, np.float64)
    mean = np.zeros((num_segments, x.shape[1]))
    rstd = np.zeros((num_segments, x.shape[1]))
    for s in np.unique(ids):
        rows = x[ids == s]
        mean[s] = rows.mean(axis=0)
        rstd[s] = 1.0 / np.sqrt(((rows - mean[s]) ** 2).mean(axis=0) + eps)
    return (x - mean[ids]) * rstd[ids], mean, rstd


# --- a mean given with rms=True ----------------------------------------------------------


def _rms_stats(x):
    """rstd of RMS norm over the last axis, from the definition (float64)."""
    return 1.0 / np.sqrt((np.asarray(x, np.float64) ** 2).mean(axis=-1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"mask": np.ones((3, 4), bool)}, {"segment_ids": np.array([0, 0, 1, 1])}],
                         ids=["plain", "mask", "segments"])
def test_a_mean_given_with_rms_is_refused_not_ignored(backend, extra):
    x = np.random.default_rng(0).standard_normal((3, 4))
    pattern = "b [d]"
    mean, rstd = x.mean(axis=-1, keepdims=True), _rms_stats(x)
    if "segment_ids" in extra:
        mean, rstd = np.repeat(mean, 2, axis=1), np.repeat(rstd, 2, axis=1)
    calls = [
        lambda: normlab.normalize(x, pattern, rms=True, mean=mean, rstd=rstd, backend=backend, **extra),
        lambda: normlab.core.normalize_with_stats(x, pattern, rms=True, mean=mean, rstd=rstd, backend=backend,
                                                  **extra),
        lambda: normlab.normalize_backward(np.ones_like(x), x, pattern, rms=True, mean=mean, rstd=rstd,
                                           backend=backend, **extra),
    ]
    for call in calls:
        with pytest.raises(InputError, match=r"mean was given with rms=True.*'b \[d\]'|'b \[d\]'.*mean was given "
                                             r"with rms=True") as error:
            call()
        assert "(3, 4)" in str(error.value) and "drop mean=" in str(error.value) and "rms=False" in str(error.value)


@pytest.mark.parametrize("options", [{"residual": np.ones((3, 4))}, {"weight_offset": 1.0, "weight": np.ones(4),
                                                                     "params": "d"}], ids=["residual", "offset"])
def test_a_mean_given_with_rms_is_refused_by_the_fused_blocks_too(options):
    x = np.random.default_rng(1).standard_normal((3, 4))
    mean, rstd = x.mean(axis=-1, keepdims=True), _rms_stats(x)
    with pytest.raises(InputError, match="mean was given with rms=True"):
        normlab.normalize(x, "b [d]", rms=True, mean=mean, rstd=rstd, **options)
    with pytest.raises(InputError, match="mean was given with rms=True"):
        normlab.normalize_backward(np.ones_like(x), x, "b [d]", rms=True, mean=mean, rstd=rstd, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rstd_alone_with_rms_still_applies_the_given_statistics(backend):
    x = np.random.default_rng(2).standard_normal((3, 4))
    rstd = _rms_stats(x) * 2.0  # not what the input gives: only the given value can produce the result
    y = normlab.normalize(x, "b [d]", rms=True, rstd=rstd, backend=backend)
    np.testing.assert_allclose(y, x * rstd, rtol=1e-12)


# --- segment ids far beyond the input ------------------------------------------------------


@pytest.mark.parametrize("call", ["normalize", "backward"])
def test_a_segment_id_of_a_trillion_is_refused_before_anything_is_allocated(call):
    x = np.ones((4, 3))
    ids = np.array([0, 1, 1, 10**12])
    with pytest.raises(ShapeError) as error:
        if call == "normalize":
            normlab.normalize(x, "[n] c", segment_ids=ids)
        else:
            normlab.normalize_backward(np.ones_like(x), x, "[n] c", segment_ids=ids)
    message = str(error.value)
    assert "'[n] c'" in message and "(4, 3)" in message and str(10**12) in message
    assert "np.unique(segment_ids, return_inverse=True)[1]" in message


@pytest.mark.parametrize("num_segments", [None, 3])
def test_a_uint64_segment_id_beyond_int64_is_named_as_given_not_as_a_negative_id(num_segments):
    x = np.ones((4, 3))
    ids = np.array([0, 1, 1, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(ShapeError) as error:
        normlab.normalize(x, "[n] c", segment_ids=ids, num_segments=num_segments)
    message = str(error.value)
    assert str(2**63 + 5) in message and "negative" not in message
    assert "np.unique(segment_ids, return_inverse=True)[1]" in message


def test_an_absurd_num_segments_is_refused_with_the_count_that_fits():
    x = np.ones((4, 3))
    with pytest.raises(ShapeError, match=r"num_segments=1000000000000.*num_segments=max\(segment_ids\) \+ 1 \(2\)"):
        normlab.normalize(x, "[n] c", segment_ids=np.array([0, 0, 1, 1]), num_segments=10**12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_compacted_ids_the_error_suggests_give_the_per_segment_norm(backend):
    x = np.random.default_rng(3).standard_normal((6, 2))
    raw = np.array([7, 7, 10**12, 10**12, 5 * 10**11, 7])
    with pytest.raises(ShapeError):
        normlab.normalize(x, "[n] c", segment_ids=raw, backend=backend)
    ids = np.unique(raw, return_inverse=True)[1]
    want, _, _ = _per_segment(x, ids, 3)
    np.testing.assert_allclose(normlab.normalize(x, "[n] c", segment_ids=ids, backend=backend), want,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_ids_a_few_times_the_element_count_still_work(backend):
    x = np.random.default_rng(4).standard_normal((5, 3))
    ids = np.array([0, 0, 44, 44, 44])  # 45 segments for 15 elements: most of them empty
    y, mean, rstd = normlab.normalize(x, "[n] c", segment_ids=ids, return_stats=True, backend=backend)
    want, want_mean, want_rstd = _per_segment(x, ids, 45)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean.reshape(45, 3), want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rstd.reshape(45, 3), want_rstd, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_explicit_num_segments_with_many_empty_segments_still_works(backend):
    x = np.random.default_rng(5).standard_normal((4, 2))
    ids = np.array([0, 0, 1, 1])
    y, mean, rstd = normlab.normalize(x, "[n] c", segment_ids=ids, num_segments=10_000, return_stats=True,
                                      backend=backend)  # a batch of 10 000 graphs, two of them with nodes
    want, want_mean, want_rstd = _per_segment(x, ids, 10_000)
    assert mean.shape == (10_000, 2)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rstd.reshape(10_000, 2), want_rstd, rtol=1e-12)


def test_errors_for_segment_ids_are_normlab_errors_and_value_errors():
    assert issubclass(ShapeError, NormlabError) and issubclass(NormlabError, ValueError)


# --- bfloat16 (ml_dtypes, as JAX hands it around) and float16 arrays ------------------------

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays come from ml_dtypes (pip install ml_dtypes)")
torch = pytest.importorskip("torch", reason="torch is the oracle for bfloat16 and float16 norms")
F = torch.nn.functional

LOW = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), torch.bfloat16), "float16": (np.dtype(np.float16), torch.float16)}
# one rounding of the float64 value: normlab computes in float32 or wider and rounds once to
# 8 (11) significant bits. torch's CPU kernels round some intermediates too (instance norm's
# affine map in bfloat16), so torch in the low dtype is the oracle of the dtype, and torch in
# float64 on the same values (the definition) the oracle of the values
TOLERANCE = {"bfloat16": dict(rtol=2**-8, atol=2**-10), "float16": dict(rtol=2**-11, atol=2**-13)}


def _low(shape, name, seed=0, scale=1.0):
    """Random values held exactly in the low-precision dtype: the NumPy array and the tensor."""
    values = np.random.default_rng(seed).standard_normal(shape) * scale
    tensor = torch.from_numpy(values).to(LOW[name][1])
    array = tensor.float().numpy().astype(LOW[name][0])
    return array, tensor


def _agrees(ours, name, torch_call, *tensors, **keywords):
    """``ours`` has the dtype torch gives ``tensors`` and, within one rounding, the value torch
    gives their float64 copies."""
    want_dtype = torch_call(*tensors, **keywords).dtype
    assert want_dtype == LOW[name][1] and ours.dtype == LOW[name][0], (ours.dtype, want_dtype)
    exact = torch_call(*(t.double() if isinstance(t, torch.Tensor) else t for t in tensors),
                       **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in keywords.items()})
    np.testing.assert_allclose(ours.astype(np.float64), exact.numpy(), **TOLERANCE[name])


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_low_precision_arrays_normalize_as_torch_normalizes_their_tensors(name):
    x, xt = _low((4, 6, 5), name)
    w, wt = _low((6,), name, seed=1)
    b, bt = _low((6,), name, seed=2)
    lw, lwt = _low((5,), name, seed=3)
    functional = normlab.functional
    _agrees(functional.layer_norm(x, 5, lw, lw), name, F.layer_norm, xt, (5,), lwt, lwt)
    _agrees(functional.group_norm(x, 3, w, b), name, F.group_norm, xt, 3, wt, bt)
    _agrees(functional.instance_norm(x, weight=w, bias=b), name, F.instance_norm, xt, weight=wt, bias=bt)
    _agrees(functional.rms_norm(x, 5, lw, eps=1e-6), name, F.rms_norm, xt, (5,), lwt, eps=1e-6)
    _agrees(normlab.normalize(x, "b c [s]", weight=w, bias=b, params="c"), name, F.instance_norm, xt,
            weight=wt, bias=bt)
    _agrees(normlab.normalize(x, "b c [s]", weight=w, params="c", backend="numpy"), name, F.instance_norm, xt,
            weight=wt)


def _torch_dtype(dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            LOW["bfloat16"][0]: torch.bfloat16}[np.dtype(dtype)]


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_low_precision_batch_norm_moves_running_statistics_as_torch_does(name):
    x, xt = _low((8, 3, 4), name)
    close = TOLERANCE[name]
    for running_dtype in (LOW[name][0], np.dtype(np.float32)):  # torch takes both beside low-precision input
        mean, var = np.zeros(3, running_dtype), np.ones(3, running_dtype)
        y = normlab.functional.batch_norm(x, mean, var, training=True)
        low = F.batch_norm(xt, torch.zeros(3, dtype=_torch_dtype(running_dtype)),
                           torch.ones(3, dtype=_torch_dtype(running_dtype)), training=True)  # torch's dtype
        exact_mean, exact_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        exact = F.batch_norm(xt.double(), exact_mean, exact_var, training=True)  # torch's values
        assert y.dtype == LOW[name][0] and low.dtype == LOW[name][1]
        assert mean.dtype == running_dtype and var.dtype == running_dtype
        np.testing.assert_allclose(y.astype(np.float64), exact.numpy(), **close)
        np.testing.assert_allclose(mean.astype(np.float64), exact_mean.numpy(), **close)
        np.testing.assert_allclose(var.astype(np.float64), exact_var.numpy(), **close)
        y = normlab.functional.batch_norm(x, mean, var, training=False)
        exact = F.batch_norm(xt.double(), torch.from_numpy(mean.astype(np.float64)),
                             torch.from_numpy(var.astype(np.float64)), training=False)
        assert y.dtype == LOW[name][0]
        np.testing.assert_allclose(y.astype(np.float64), exact.numpy(), **close)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_low_precision_gradients_are_torch_autograds(name):
    x, xt = _low((3, 8), name)
    w, wt = _low((8,), name, seed=1)
    g, gt = _low((3, 8), name, seed=2)
    low_x, low_w = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    F.layer_norm(low_x, (8,), low_w).backward(gt)  # torch's dtypes
    xt, wt = xt.double().requires_grad_(True), wt.double().requires_grad_(True)
    F.layer_norm(xt, (8,), wt).backward(gt.double())  # torch's values, in float64
    gx, gw, gb = normlab.normalize_backward(g, x, "b [d]", weight=w, params="d")
    for ours, low, want in ((gx, low_x, xt), (gw, low_w, wt)):
        assert ours.dtype == LOW[name][0] and low.grad.dtype == LOW[name][1]
        np.testing.assert_allclose(ours.astype(np.float64), want.grad.numpy(), **TOLERANCE[name])
    np.testing.assert_allclose(gb.astype(np.float64), g.astype(np.float64).sum(axis=0), **TOLERANCE[name])


def test_bfloat16_follows_torchs_dtypes_for_out_residual_and_masks():
    x, xt = _low((4, 6), "bfloat16")
    r, rt = _low((4, 6), "bfloat16", seed=1)
    h, ht = _low((4, 6), "float16", seed=2)
    out = np.empty_like(x)
    assert normlab.normalize(x, "b [d]", out=out) is out
    _agrees(out, "bfloat16", F.layer_norm, xt, (6,))
    y, total = normlab.normalize(x, "b [d]", residual=r)
    _agrees(total, "bfloat16", torch.add, xt, rt)
    # the sum the model carries, rounded to bfloat16 (``.to(a.dtype)`` alone is a no-op in float64)
    _agrees(y, "bfloat16", lambda a, b: F.layer_norm((a + b).bfloat16().to(a.dtype), (6,)), xt, rt)
    s, st = _low((4, 6), "bfloat16", seed=3)
    y = normlab.normalize(x, "b [d]", scale=s, shift=r, modulation="b d")
    _agrees(y, "bfloat16", lambda a, b, c: F.layer_norm(a, (6,)) * (1 + b) + c, xt, st, rt)
    _, mixed = normlab.normalize(x, "b [d]", residual=h)  # NumPy cannot promote these two; torch can
    assert mixed.dtype == np.dtype(str(torch.result_type(xt, ht)).removeprefix("torch."))
    mask = np.array([True, True, True, False, True, True])
    y = normlab.normalize(x, "b [d]", mask=mask)
    assert y.dtype == x.dtype

    def masked_layer_norm(t):  # the definition: statistics of the counted elements only
        counted = t.double()[:, mask]
        y = (t.double() - counted.mean(1, keepdim=True)) / torch.sqrt(counted.var(1, unbiased=False, keepdim=True)
                                                                       + 1e-5)
        return y.to(t.dtype)

    _agrees(y, "bfloat16", masked_layer_norm, xt)


def _half_ulp_of_bfloat16(values):
    """Half the spacing of bfloat16 (8 significant bits) at ``values``: a once-rounded result
    lies within it of the exact value."""
    _, exponent = np.frexp(np.abs(values.astype(np.float64)))
    return np.ldexp(0.5, exponent - 8)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_bfloat16_results_lie_within_half_a_unit_in_the_last_place_of_torchs_float64_values(backend):
    """What the README promises: computed as float32 arrays are, rounded to bfloat16 through
    float32, so within half a bfloat16 ulp of the float64 value (float32's rounding aside)."""
    x, xt = _low((512, 256), "bfloat16", scale=3.0)
    w, wt = _low((256,), "bfloat16", seed=1)
    g, gt = _low((512, 256), "bfloat16", seed=2)
    x64, w64 = xt.double().requires_grad_(True), wt.double().requires_grad_(True)
    exact = F.layer_norm(x64, (256,), w64)
    exact.backward(gt.double())
    gx, gw, _ = normlab.normalize_backward(g, x, "b [d]", weight=w, params="d", backend=backend)
    pairs = [(normlab.normalize(x, "b [d]", weight=w, params="d", backend=backend), exact.detach(), 0.0),
             (normlab.normalize(x, "[b] d", backend=backend), F.batch_norm(xt.double(), None, None, training=True), 0.0),
             (normlab.normalize(x, "b (g [c])", g=4, backend=backend), F.group_norm(xt.double(), 4), 0.0),
             (normlab.normalize(x, "b [d]", rms=True, backend=backend), F.rms_norm(xt.double(), (256,), eps=1e-5), 0.0),
             # a gradient cancels within its row: float32 arithmetic leaves an error of the row's scale
             (gx, x64.grad, 2**-20 * x64.grad.abs().max().item()), (gw, w64.grad, 0.0)]
    for ours, want, slack in pairs:
        error = np.abs(ours.astype(np.float64) - want.numpy())
        assert (error <= _half_ulp_of_bfloat16(ours) * (1 + 2**-8) + slack).all(), error.max()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_bfloat16_residual_block_normalizes_the_sum_rounded_to_bfloat16_on_every_backend(backend):
    """The model carries ``x + r`` in bfloat16 and normalizes that; the float32 kernels once
    normalized the unrounded float32 sum, off by up to a unit in the last place."""
    x, xt = _low((16, 64), "bfloat16")
    r, rt = _low((16, 64), "bfloat16", seed=1)
    w, wt = _low((64,), "bfloat16", seed=2)
    g, gt = _low((16, 64), "bfloat16", seed=3)
    g_sum, g_sum_t = _low((16, 64), "bfloat16", seed=4)
    total_t = (xt + rt).double().requires_grad_(True)  # torch's bfloat16 sum, then float64 from there
    w64 = wt.double().requires_grad_(True)
    exact = F.layer_norm(total_t, (64,), w64)
    exact.backward(gt.double())
    y, total = normlab.normalize(x, "b [d]", residual=r, weight=w, params="d", backend=backend)
    grads = normlab.normalize_backward(g, x, "b [d]", residual=r, weight=w, params="d", grad_sum=g_sum,
                                       backend=backend)
    assert np.array_equal(total.astype(np.float64), total_t.detach().numpy())
    for ours, want in ((y, exact.detach()), (grads.x, total_t.grad + g_sum_t.double()), (grads.weight, w64.grad)):
        error = np.abs(ours.astype(np.float64) - want.numpy())
        assert (error <= _half_ulp_of_bfloat16(ours) * (1 + 2**-8)).all(), error.max()


def test_importing_normlab_does_not_import_ml_dtypes():
    import os
    import subprocess
    import sys

    code = "import sys, normlab, normlab.functional; print('ml_dtypes' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "False"


# --- axes named like normalize's own keywords ------------------------------------------------


def _group_norm_2d(x, groups, eps=1e-5):
    """Group norm of (batch, channels) from the definition (float64)."""
    parts = np.asarray(x, np.float64).reshape(x.shape[0], groups, -1)
    centered = parts - parts.mean(axis=-1, keepdims=True)
    return (centered / np.sqrt((centered**2).mean(axis=-1, keepdims=True) + eps)).reshape(x.shape)


@pytest.mark.parametrize("name", ["x", "eps", "scale", "pattern", "sizes", "weight"])
def test_an_axis_named_like_a_keyword_takes_its_size_from_the_sizes_mapping(name):
    x = np.random.default_rng(6).standard_normal((2, 12))
    pattern = f"b ({name} [c])"
    want = _group_norm_2d(x, 3)
    np.testing.assert_allclose(normlab.normalize(x, pattern, sizes={name: 3}), want, rtol=1e-12, atol=1e-12)
    y, stats = normlab.core.normalize_with_stats(x, pattern, sizes={name: 3})
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    assert stats.rstd.shape == (2, 3, 1)
    y, total = normlab.normalize(x, pattern, sizes={name: 3}, residual=np.zeros_like(x))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    y = normlab.normalize(x, f"[b] ({name} c)", sizes={name: 3}, segment_ids=np.array([0, 0]))
    np.testing.assert_allclose(y, (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5), rtol=1e-12)  # one segment
    assert normlab.make_plan(pattern, x.shape, sizes={name: 3}).stats_shape == (2, 3, 1)


@pytest.mark.parametrize("options", [{}, {"mask": np.ones((2, 12), bool)}], ids=["plain", "mask"])
def test_gradients_with_sizes_from_the_mapping_are_torch_autograds_of_group_norm(options):
    x = np.random.default_rng(7).standard_normal((2, 12))
    g = np.random.default_rng(8).standard_normal((2, 12))
    w = np.random.default_rng(9).standard_normal(12)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    F.group_norm(xt, 3, wt).backward(torch.tensor(g))
    gx, gw, _ = normlab.normalize_backward(g, x, "b (eps [scale])", sizes={"eps": 3}, weight=w,
                                           params="(eps scale)", **options)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_the_sizes_mapping_combines_with_keywords():
    x = np.random.default_rng(10).standard_normal((2, 12))
    y = normlab.normalize(x, "b (x g [c])", sizes={"x": 3}, g=2)
    np.testing.assert_allclose(y, _group_norm_2d(x, 6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", ["normalize", "backward", "with_stats", "plan"])
def test_an_axis_sized_both_in_the_mapping_and_as_a_keyword_is_refused(call):
    x = np.ones((2, 12))
    calls = {
        "normalize": lambda: normlab.normalize(x, "b (g [c])", sizes={"g": 3}, g=3),
        "backward": lambda: normlab.normalize_backward(x, x, "b (g [c])", sizes={"g": 3}, g=4),
        "with_stats": lambda: normlab.core.normalize_with_stats(x, "b (g [c])", sizes={"g": 3}, g=3),
        "plan": lambda: normlab.make_plan("b (g [c])", x.shape, sizes={"g": 3}, g=3),
    }
    with pytest.raises(ShapeError, match=r"'b \(g \[c\]\)', input shape \(2, 12\).*g.*both in sizes= and as a "
                                         r"keyword.*give each axis size once"):
        calls[call]()


@pytest.mark.parametrize("sizes", [3, [("x", 3)], {3: 3}], ids=["int", "list", "int-key"])
def test_sizes_that_are_not_a_mapping_of_names_are_refused_with_an_example(sizes):
    with pytest.raises(ShapeError, match=r"'b \(x \[c\]\)', input shape \(2, 12\).*sizes=\{'x': 3\}"):
        normlab.normalize(np.ones((2, 12)), "b (x [c])", sizes=sizes)


@pytest.mark.parametrize("call", [
    lambda x, pattern, **sizes: normlab.normalize(x, pattern, **sizes),
    lambda x, pattern, **sizes: normlab.normalize_backward(x, x, pattern, **sizes),
    lambda x, pattern, **sizes: normlab.normalize(x, pattern, mask=x > 0, **sizes),
], ids=["forward", "backward", "mask"])
@pytest.mark.parametrize("name", ["eps", "mean", "x", "scale"])
def test_a_missing_or_wrong_size_of_an_axis_named_like_a_keyword_is_asked_for_in_the_sizes_mapping(call, name):
    """The message said "give all but one as keyword arguments, e.g. eps=..." (or "pass eps=12"),
    which sets normalize's own eps, not the axis: only sizes= can size it."""
    x = np.random.default_rng(6).standard_normal((2, 12))
    with pytest.raises(ShapeError, match=re.escape(f"e.g. sizes={{{name!r}: ...}}")):
        call(x, f"b ({name} [c])")
    with pytest.raises(ShapeError, match=re.escape(f"pass sizes={{{name!r}: 12}}")):
        call(x, f"b [{name}]", sizes={name: 5})
    with pytest.raises(ShapeError, match=re.escape("e.g. g=...")):  # other names stay keywords
        call(x, "b (g [c])")


def test_the_command_line_asks_for_an_axis_named_like_a_keyword_as_name_equals_size(tmp_path):
    from tests.test_cli import normlab_cli

    result = normlab_cli("explain", "b (eps [c])", "--shape", "2,6", cwd=tmp_path)
    assert result.returncode == 2 and "e.g. eps=..." in result.stderr and "sizes=" not in result.stderr


def test_explain_sizes_an_axis_named_like_a_keyword(tmp_path):
    from tests.test_cli import normlab_cli

    result = normlab_cli("explain", "b (x [c])", "--data", "[[1, 3, 5, 9]]", "x=2", "--no-color", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "x=2" in result.stdout and "2 groups of 2" in result.stdout


# --- mixed dtypes in normlab.functional: where torch raises, they raise ----------------------

DTYPES = {"float16": (np.dtype(np.float16), torch.float16), "bfloat16": LOW["bfloat16"],
          "float32": (np.dtype(np.float32), torch.float32), "float64": (np.dtype(np.float64), torch.float64)}


def _pair(shape, name, fill=None, seed=0):
    """An array and a tensor of dtype ``name`` holding the same values."""
    values = np.random.default_rng(seed).standard_normal(shape) if fill is None else np.full(shape, float(fill))
    tensor = torch.from_numpy(values).to(DTYPES[name][1])
    return tensor.float().numpy().astype(DTYPES[name][0]), tensor


def _calls(function, x_name, p_name):
    """``(ours, torch's)``: the same call with input dtype ``x_name`` and parameters of ``p_name``."""
    x, xt = _pair((4, 6, 3), x_name)
    w, wt = _pair((6,), p_name, fill=1.5, seed=1)
    lw, lwt = _pair((3,), p_name, fill=1.5, seed=2)
    nf = normlab.functional
    if function == "layer_norm":
        return lambda: nf.layer_norm(x, 3, lw, lw), lambda: F.layer_norm(xt, (3,), lwt, lwt)
    if function == "group_norm":
        return lambda: nf.group_norm(x, 2, w, w), lambda: F.group_norm(xt, 2, wt, wt)
    if function == "instance_norm":
        return lambda: nf.instance_norm(x, weight=w, bias=w), lambda: F.instance_norm(xt, weight=wt, bias=wt)
    if function == "batch_norm running":
        mean, mean_t = _pair((6,), p_name, fill=0)
        var, var_t = _pair((6,), p_name, fill=1)
        return (lambda: nf.batch_norm(x, mean, var, training=True),
                lambda: F.batch_norm(xt, mean_t, var_t, training=True))
    if function == "batch_norm weight":
        mean, mean_t = _pair((6,), x_name, fill=0)
        var, var_t = _pair((6,), x_name, fill=1)
        return (lambda: nf.batch_norm(x, mean, var, weight=w, training=False),
                lambda: F.batch_norm(xt, mean_t, var_t, weight=wt, training=False))
    assert function == "rms_norm"
    return lambda: nf.rms_norm(x, 3, lw), lambda: F.rms_norm(xt, (3,), lwt)


@pytest.mark.parametrize("function", ["layer_norm", "group_norm", "instance_norm", "batch_norm running",
                                      "batch_norm weight", "rms_norm"])
def test_functional_refuses_exactly_the_dtype_mixes_torch_refuses(function):
    for x_name in DTYPES:
        for p_name in DTYPES:
            ours, theirs = _calls(function, x_name, p_name)
            try:
                want = theirs()
            except RuntimeError:
                with pytest.raises(normlab.ParamsError, match=rf"{function.split()[0]}: the input is .*refuses "
                                                              r"mixed dtypes.*\.astype\(x\.dtype\)"):
                    ours()
                continue
            got = ours()
            assert got.dtype == DTYPES[str(want.dtype).removeprefix("torch.")][0], (x_name, p_name)


def test_parameters_given_as_lists_take_the_inputs_dtype():
    x = np.random.default_rng(11).standard_normal((2, 3)).astype(np.float32)
    want = F.layer_norm(torch.from_numpy(x), (3,), torch.tensor([1.0, 2.0, 3.0]))
    got = normlab.functional.layer_norm(x, 3, [1.0, 2.0, 3.0])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [{}, {"residual": np.zeros((2, 3), np.float32)}], ids=["plain", "fused"])
def test_gradients_of_parameters_given_as_lists_take_the_inputs_dtype(fused):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    F.layer_norm(x, (3,), weight).sum().backward()
    grads = normlab.normalize_backward(np.ones((2, 3), np.float32), x.detach().numpy().astype(np.float32), "b [d]",
                                       weight=[1.0, 2.0, 3.0], params="d", **fused)
    grad_x, grad_weight = (grads.x, grads.weight) if fused else grads[:2]
    assert grad_x.dtype == grad_weight.dtype == np.float32
    np.testing.assert_allclose(grad_weight, weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, x.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [{}, {"residual": np.zeros((2, 3))}], ids=["plain", "fused"])
def test_gradients_of_big_endian_parameters_come_in_the_machines_byte_order(fused):
    x = np.random.default_rng(12).standard_normal((2, 3))
    weight = np.array([1.0, 2.0, 3.0])
    want = normlab.normalize_backward(np.ones((2, 3)), x, "b [d]", weight=weight, params="d", **fused)
    grads = normlab.normalize_backward(np.ones((2, 3)), x, "b [d]", weight=weight.astype(">f8"), params="d", **fused)
    grad_weight, want_weight = (grads.weight, want.weight) if fused else (grads[1], want[1])
    assert grad_weight.dtype == np.dtype(np.float64) and grad_weight.dtype.isnative
    np.testing.assert_array_equal(grad_weight, want_weight)


@pytest.mark.parametrize("x_dtype", [np.int64, np.int32, np.bool_])
def test_the_cast_suggested_for_a_float32_weight_beside_integer_input_makes_the_call_work(x_dtype):
    """Integer input is read as float64, so the fix is a float64 weight, not ``x.dtype``'s."""
    x = (np.arange(12).reshape(4, 3) % 5).astype(x_dtype)
    weight = np.array([0.5, 1.5, 2.0], np.float32)
    with pytest.raises(normlab.ParamsError) as error:
        normlab.functional.layer_norm(x, 3, weight)
    message = str(error.value)
    assert f"the input is {np.dtype(x_dtype)} (read as float64" in message
    cast = re.search(r"pass weight\.astype\((np\.float64|x\.dtype)\)", message).group(1)
    fixed = normlab.functional.layer_norm(x, 3, weight.astype({"np.float64": np.float64, "x.dtype": x.dtype}[cast]))
    want = F.layer_norm(torch.from_numpy(x.astype(np.float64)), (3,), torch.from_numpy(weight.astype(np.float64)))
    np.testing.assert_allclose(fixed, want.numpy(), rtol=1e-12, atol=1e-12)


_X = np.arange(24.0).reshape(4, 6) % 5
_LONG = np.longdouble
_BESIDE_X = {
    "weight": lambda: normlab.normalize(_X, "b [f]", weight=np.ones(6, _LONG), params="f"),
    "bias": lambda: normlab.normalize(_X, "b [f]", bias=np.zeros(6, _LONG), params="f"),
    "weight, masked": lambda: normlab.normalize(_X, "b [f]", weight=np.ones(6, _LONG), params="f",
                                                mask=_X > 0),
    "weight, segments": lambda: normlab.normalize(_X, "b [f]", weight=np.ones(6, _LONG), params="f",
                                                  segment_ids=[0, 0, 1, 1, 2, 2], segment_axis="f"),
    "gate": lambda: normlab.normalize(_X, "b [f]", rms=True, gate=np.ones((4, 6), _LONG)),
    "residual": lambda: normlab.normalize(_X, "b [f]", residual=np.ones((4, 6), _LONG)),
    "scale": lambda: normlab.normalize(_X, "b [f]", scale=np.ones(4, _LONG), modulation="b"),
    "shift": lambda: normlab.normalize(_X, "b [f]", shift=np.ones(4, _LONG), modulation="b"),
    "mean": lambda: normlab.normalize(_X, "b [f]", mean=np.zeros((4, 1), _LONG), rstd=np.ones((4, 1))),
    "rstd": lambda: normlab.normalize(_X, "b [f]", rms=True, rstd=np.ones((4, 1), _LONG)),
    "backward weight": lambda: normlab.normalize_backward(np.ones((4, 6)), _X, "b [f]", weight=np.ones(6, _LONG),
                                                          params="f"),
    "backward gate": lambda: normlab.normalize_backward(np.ones((4, 6)), _X, "b [f]", rms=True,
                                                        gate=np.ones((4, 6), _LONG)),
}


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
@pytest.mark.parametrize("argument", sorted(_BESIDE_X))
def test_a_long_double_array_beside_x_is_refused_as_a_long_double_x_is(argument):
    """x of dtype long double is refused (normalize computes in float64 at most); a weight,
    bias, gate, scale, shift or statistic of that dtype was read, rounded to float64 without
    a word. Each is now refused with an error that repeats the pattern and the shape, names
    the argument and its dtype, and says what to cast it to."""
    with pytest.raises(NormlabError, match=r"input shape \(4, 6\)"):
        normlab.normalize(_X.astype(np.longdouble), "b [f]")
    with pytest.raises(NormlabError) as info:
        _BESIDE_X[argument]()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "pattern 'b [f]', input shape (4, 6)" in message and str(np.dtype(np.longdouble)) in message
    assert f"{argument.split(',')[0].split()[-1]}.astype(np." in message


@pytest.mark.parametrize("argument", ["x", "weight"])
def test_a_tensor_that_requires_grad_is_pointed_to_normlab_torch_whose_normalize_gives_torchs_gradients(argument):
    # the message said "pass a NumPy array, or nested lists", which a torch user is not
    # holding and which loses the gradient they came for
    import normlab.torch as nt

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(InputError) as caught:
        normlab.normalize(x if argument == "x" else x.detach(), "b [f]", params="f",
                          weight=weight if argument == "weight" else weight.detach())
    message = str(caught.value)
    assert "normlab.torch.normalize takes tensors" in message and f"{argument}.detach().cpu().numpy()" in message
    assert "nested lists" not in message
    # the fix it names: torch's layer norm and its gradients
    ours = nt.normalize(x, "b [f]", weight=weight, params="f")
    grads = torch.autograd.grad(ours.sum() + (ours ** 2).sum(), (x, weight))
    theirs = F.layer_norm(x, (4,), weight)
    torch.testing.assert_close(ours, theirs)
    for got, want in zip(grads, torch.autograd.grad(theirs.sum() + (theirs ** 2).sum(), (x, weight))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("argument", ["x", "weight"])
def test_a_bfloat16_tensor_is_pointed_to_a_numpy_array_that_numpy_can_hold(argument, requires_grad):
    # the message offered x.detach().cpu().numpy(), which torch refuses for bfloat16 ("Got
    # unsupported ScalarType BFloat16"): NumPy has no bfloat16, and float32 holds its values
    x = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=requires_grad)
    weight = torch.randn(4, dtype=torch.bfloat16, requires_grad=requires_grad)
    given = {"x": x if argument == "x" else x.float().detach().numpy(),
             "weight": weight if argument == "weight" else weight.float().detach().numpy()}
    with pytest.raises(InputError) as caught:
        normlab.normalize(given["x"], "b [f]", params="f", weight=given["weight"])
    expression = re.search(rf"takes ({argument}\.[\w.()]+)\)", str(caught.value)).group(1)
    given[argument] = eval(expression, {}, {argument: {"x": x, "weight": weight}[argument]})  # the named fix, run
    y = normlab.normalize(given["x"], "b [f]", params="f", weight=given["weight"])
    expected = F.layer_norm(x.detach().float(), (4,), weight.detach().float())
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-5)


# -- an input too large for memory --------------------------------------------------------

HUGE = (10**5, 10**5, 10**5)  # (a broadcast view: NumPy cannot allocate its float32 copy, 4e15 bytes)


def _by_definition(x, axes, eps=1e-5):
    """The float64 definition: each group over ``axes`` standardized with its biased variance."""
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("pattern, reduced", [("b t [d]", (2,)), ("[b] c t", (0,)), ("[...] c", (0, 1)),
                                              ("... [t]", (2,))])
def test_an_input_too_large_for_memory_is_told_its_pattern_shape_and_the_axis_to_split_it_along(backend, pattern,
                                                                                                  reduced):
    """A bare MemoryError ("Unable to allocate 3.55 PiB ...") named neither the pattern nor a way
    to fit; the advice, followed on a small input, gives the definition's result."""
    with pytest.raises(MemoryError) as caught:
        normlab.normalize(np.broadcast_to(np.float32(1), HUGE), pattern, backend=backend)
    message = str(caught.value)
    assert f"pattern {pattern!r}, input shape {HUGE}" in message and "Unable to allocate" in message
    axis = int(re.search(r"np\.array_split\(x, 100, axis=(-?\d+)\)", message).group(1))
    x = np.random.default_rng(0).standard_normal((4, 6, 5))
    parts = [normlab.normalize(part, pattern, backend=backend) for part in np.array_split(x, 3, axis=axis)]
    np.testing.assert_allclose(np.concatenate(parts, axis=axis), _by_definition(x, reduced), rtol=1e-12, atol=1e-12)


def test_an_input_too_large_whose_axes_all_share_statistics_is_told_to_normalize_parts_with_given_statistics():
    with pytest.raises(MemoryError, match=r"pattern '\[b\] \[c t\]', input shape \(100000, 100000, 100000\): "
                                          r"Unable to allocate.*no axis outside the brackets.*mean= and rstd="):
        normlab.normalize(np.broadcast_to(np.float32(1), HUGE), "[b] [c t]")


def test_a_backward_too_large_for_memory_is_told_to_sum_the_parameter_gradients_of_its_parts():
    x = np.broadcast_to(np.float32(1), HUGE)
    with pytest.raises(MemoryError, match=r"pattern 'b t \[d\]', input shape \(100000, 100000, 100000\).*"
                                          r"split x and grad_y.*axis=0.*sum the weight and bias gradients"):
        normlab.normalize_backward(x, x, "b t [d]")


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("pattern, reduced", [("[b] c [t]", (0, 2)), ("[b t] c", (0, 1))])
def test_an_input_too_large_whose_only_free_axis_holds_the_weight_is_told_to_split_the_weight_too(backend, pattern,
                                                                                                  reduced):
    """Batch norm's channels are the only axis outside the brackets, and params="c" spans
    them: "normalize(part, ...)" on channel parts with the whole weight raised a ShapeError.
    Oracle: the float64 definition, weighted by hand; torch autograd for the backward."""
    torch = pytest.importorskip("torch")
    params = {"params": "c", "weight": np.ones(HUGE[1]), "bias": np.zeros(HUGE[1])}
    with pytest.raises(MemoryError) as caught:
        normlab.normalize(np.broadcast_to(np.float32(1), HUGE), pattern, backend=backend, **params)
    message = str(caught.value)
    axis = int(re.search(r"np\.array_split\(x, 100, axis=(-?\d+)\)", message).group(1))
    at = int(re.search(r"np\.array_split\(weight, 100, axis=(-?\d+)\)", message).group(1))
    assert re.search(rf"np\.array_split\(bias, 100, axis={at}\)", message)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 5)) if pattern == "[b] c [t]" else rng.standard_normal((4, 5, 6))
    weight, bias = rng.standard_normal(6), rng.standard_normal(6)
    parts = [normlab.normalize(part, pattern, params="c", weight=w, bias=b, backend=backend)
             for part, w, b in zip(np.array_split(x, 3, axis=axis), np.array_split(weight, 3, axis=at),
                                   np.array_split(bias, 3, axis=at))]
    shape = [1, 1, 1]
    shape[axis] = 6
    expected = _by_definition(x, reduced) * weight.reshape(shape) + bias.reshape(shape)
    np.testing.assert_allclose(np.concatenate(parts, axis=axis), expected, rtol=1e-12, atol=1e-12)

    with pytest.raises(MemoryError) as caught:
        big = np.broadcast_to(np.float32(1), HUGE)
        normlab.normalize_backward(big, big, pattern, backend=backend, **params)
    message = str(caught.value)
    axis = int(re.search(r"np\.array_split\(\.\.\., 100, axis=(-?\d+)\)", message).group(1))
    at = int(re.search(r"np\.array_split\(weight, 100, axis=(-?\d+)\)", message).group(1))
    assert f"the weight and bias gradients on axis {at}" in message
    grad_y = rng.standard_normal(x.shape)
    pieces = [normlab.normalize_backward(g, part, pattern, params="c", weight=w, backend=backend)
              for g, part, w in zip(np.array_split(grad_y, 3, axis=axis), np.array_split(x, 3, axis=axis),
                                    np.array_split(weight, 3, axis=at))]
    got = [np.concatenate([piece[i] for piece in pieces], axis=axis if i == 0 else at) for i in range(3)]
    leaves = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    channels_first = leaves[0] if pattern == "[b] c [t]" else leaves[0].transpose(1, 2)
    y = torch.nn.functional.batch_norm(channels_first, None, None, leaves[1], leaves[2], training=True, eps=1e-5)
    y = y if pattern == "[b] c [t]" else y.transpose(1, 2)
    expected = torch.autograd.grad(y, leaves, torch.tensor(grad_y))
    for mine, theirs in zip(got, expected):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", [False, True], ids=["normalize", "normalize_backward"])
def test_an_input_too_large_with_a_mask_is_told_to_split_the_mask_with_it(backward):
    """A mask was left out of the advice: its parts passed with the whole mask raised a
    ShapeError ("does not broadcast"). Oracle: the float64 definition over the elements the
    mask keeps, computed by hand."""
    big = np.broadcast_to(np.float32(1), HUGE)
    with pytest.raises(MemoryError) as caught:
        if backward:
            normlab.normalize_backward(big, big, "b c [t]", mask=np.broadcast_to(True, (HUGE[0], 1, HUGE[2])))
        else:
            normlab.normalize(big, "b c [t]", mask=np.broadcast_to(True, (HUGE[0], 1, HUGE[2])))
    message = str(caught.value)
    found = re.search(r"np\.array_split\(np\.broadcast_to\(mask, x\.shape\), 100, axis=(-?\d+)\)", message)
    assert found, message
    axis = int(found.group(1))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6, 5))
    mask = rng.random((4, 1, 5)) < 0.6
    mask[:, :, 0] = True
    parts = [normlab.normalize(part, "b c [t]", mask=m) for part, m in
             zip(np.array_split(x, 3, axis=axis), np.array_split(np.broadcast_to(mask, x.shape), 3, axis=axis))]
    got = np.concatenate(parts, axis=axis)
    full = np.broadcast_to(mask, x.shape)
    for index in np.ndindex(4, 6):
        row, kept = x[index], full[index]
        expected = (row[kept] - row[kept].mean()) / np.sqrt(row[kept].var() + 1e-5)
        np.testing.assert_allclose(got[index][kept], expected, rtol=1e-12, atol=1e-12)
