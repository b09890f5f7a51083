"""The fast path of repeated ``normalize`` calls: a call with the same pattern, shape,
dtypes and flags as an earlier one skips the checks and the plan, and gives what torch
gives; anything the cached decisions do not cover still gets the full checks and their
clear errors. Oracle: torch's own functions."""

import gc
import re
import tracemalloc

import numpy as np
import pytest

import normlab
from normlab import core
from normlab.errors import InputError, ParamsError, ShapeError

torch = pytest.importorskip("torch")
pytest.importorskip("numba")


def _torch_layer_norm(x, weight=None, bias=None, eps=1e-5):
    t = torch.tensor(x, dtype=torch.float64)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    return torch.nn.functional.layer_norm(t, x.shape[-1:], w, b, eps).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_repeated_call_skips_the_plan_and_still_matches_torch(dtype, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 96)).astype(dtype)
    w, b = rng.standard_normal(96).astype(dtype), rng.standard_normal(96).astype(dtype)
    normlab.normalize(x, "b [d]", weight=w, bias=b, params="d")

    def no_plan(*args, **kwargs):
        raise AssertionError("the repeated call built a plan")

    monkeypatch.setattr(core, "make_plan", no_plan)
    for _ in range(2):
        x = rng.standard_normal((5, 96)).astype(dtype)
        y, mean, rstd = normlab.normalize(x, "b [d]", weight=w, bias=b, params="d", return_stats=True)
        np.testing.assert_allclose(y, _torch_layer_norm(x, w, b), rtol=0, atol=1e-5)
        assert y.dtype == dtype and mean.shape == (5, 1) and rstd.shape == (5, 1)
        np.testing.assert_allclose(mean[:, 0], x.astype(np.float64).mean(axis=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_params", [False, True], ids=["no_params", "weight_and_bias"])
@pytest.mark.parametrize("return_stats", [False, True])
def test_a_repeated_small_call_runs_the_kernels_bound_runner_without_helper_calls(with_params, return_stats):
    """A repeated call on an array in C order of the plan's dtype runs the plan's runner,
    its attributes bound once (no ``FastForward.run``: no ``run_serial``, ``_scratch``), and reads the
    default weight offset and absent parameters without a call (``_no_offset``,
    ``_dtype_of``): Python a small call's time is made of. Oracle: torch's layer norm."""
    import cProfile
    import pstats

    rng = np.random.default_rng(31)
    x = rng.standard_normal((2, 768)).astype(np.float32)
    weight, bias = (rng.standard_normal(768).astype(np.float32) for _ in range(2))
    params = dict(weight=weight, bias=bias, params="c") if with_params else {}
    for _ in range(2):  # (the first builds the fast call, the second its runner)
        normlab.normalize(x, "b [c]", return_stats=return_stats, **params)
    profile = cProfile.Profile()
    result = profile.runcall(normlab.normalize, x, "b [c]", return_stats=return_stats, **params)
    called = {name for _, _, name in pstats.Stats(profile).stats}
    assert called.isdisjoint({"run_serial", "_scratch", "_no_offset"} | (set() if with_params else {"_dtype_of"}))
    y = result[0] if return_stats else result
    expected = _torch_layer_norm(x, weight, bias) if with_params else _torch_layer_norm(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_an_eps_given_as_a_numpy_float64_takes_the_fast_path_too(monkeypatch):
    # eps read from an array or a config file is np.float64; it took the full checks on every call
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    normlab.normalize(x, "b [d]", eps=np.float64(1e-3))

    def no_plan(*args, **kwargs):
        raise AssertionError("the repeated call built a plan")

    with monkeypatch.context() as patched:
        patched.setattr(core, "make_plan", no_plan)
        y = normlab.normalize(x, "b [d]", eps=np.float64(1e-3))
    np.testing.assert_allclose(y, _torch_layer_norm(x, eps=1e-3), rtol=0, atol=1e-5)
    for eps in (-1.0, np.nan, np.inf):
        with pytest.raises(InputError, match="eps must be a finite number"):
            normlab.normalize(x, "b [d]", eps=np.float64(eps))


def test_a_repeated_call_with_a_bad_weight_or_eps_gets_the_full_checks():
    x = np.ones((2, 8), np.float32)
    normlab.normalize(x, "b [d]", weight=np.ones(8, np.float32), params="d")
    with pytest.raises(ParamsError, match=r"weight has shape \(7,\)"):
        normlab.normalize(x, "b [d]", weight=np.ones(7, np.float32), params="d")
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="eps must be a finite number"):
            normlab.normalize(x, "b [d]", weight=np.ones(8, np.float32), params="d", eps=eps)


def test_parameters_laid_out_out_of_order_take_the_fast_path_correctly():
    """``params="w h"`` on ``"b [h w]"``: the table is the weight transposed, not reshaped."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 3)).astype(np.float32)  # (w, h)
    for _ in range(3):
        x = rng.standard_normal((2, 3, 4)).astype(np.float32)
        y = normlab.normalize(x, "b [h w]", weight=weight, params="w h")
        expected = _torch_layer_norm(x.reshape(2, 12), weight.T.reshape(12)).reshape(x.shape)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)


def test_group_norm_repeated_calls_match_torch():
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    for _ in range(3):
        x = rng.standard_normal((2, 6, 5)).astype(np.float32)
        y = normlab.normalize(x, "b (g [c]) [s]", weight=w, bias=b, params="(g c)", g=3)
        expected = torch.nn.functional.group_norm(torch.tensor(x, dtype=torch.float64), 3, torch.tensor(w),
                                                  torch.tensor(b)).numpy()
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)


def test_a_repeated_call_never_modifies_its_inputs_and_returns_fresh_outputs():
    x = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    x.flags.writeable = False
    first = normlab.normalize(x, "b [d]")
    second = normlab.normalize(x, "b [d]")
    assert first is not second and not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("size", [4.0, np.float64(4.0), True])
def test_a_size_that_is_no_integer_is_refused_even_after_the_integer_was_cached(size):
    """``g=4.0`` and ``g=True`` equal ``g=4`` and ``g=1`` as dictionary keys, but sizes
    must be integers: the fast call that an integer size left must not take them."""
    x = np.ones((2, 8, 3))
    valid = 1 if size is True else 4
    for _ in range(2):
        normlab.normalize(x, "b (g [c]) [h]", g=valid)
    with pytest.raises(ShapeError, match=re.escape(f"g={size!r} is not a positive integer")):
        normlab.normalize(x, "b (g [c]) [h]", g=size)
    y = normlab.normalize(x, "b (g [c]) [h]", g=np.int64(valid))  # a NumPy integer is an integer
    np.testing.assert_array_equal(y, np.zeros_like(x))  # constant groups: exact zeros


def _layouts(base: np.ndarray):
    """``base``'s values in other layouts and array kinds, each the same shape and dtype."""
    read_only = base.copy()
    read_only.flags.writeable = False
    wide = np.concatenate([base, base], axis=-1)
    return {
        "fortran": np.asfortranarray(base),
        "reversed rows": base[::-1].copy()[::-1],
        "reversed columns": np.ascontiguousarray(base[:, ::-1])[:, ::-1],
        "column slice": wide[:, :base.shape[1]],
        "every other row": np.repeat(base, 2, axis=0)[::2],
        "read-only": read_only,
        "masked, nothing masked": np.ma.masked_array(base, mask=np.zeros(base.shape, bool)),
        "matrix": np.matrix(base),
        "broadcast row": np.broadcast_to(base[:1], base.shape),
    }


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_arrays_of_a_cached_shape_in_any_layout_get_the_definition_and_stay_unmodified(dtype):
    """The fast path cached for a C-contiguous (6, 40) array serves every array of that
    shape and dtype: strided, reversed, Fortran-ordered, read-only, subclasses. Oracle:
    the float64 definition (biased variance, eps 1e-5)."""
    rng = np.random.default_rng(4)
    base = (rng.standard_normal((6, 40)) * 3 + 5).astype(dtype)
    weight, bias = rng.standard_normal(40).astype(dtype), rng.standard_normal(40).astype(dtype)
    for _ in range(2):
        normlab.normalize(base, "b [d]", weight=weight, bias=bias, params="d")
    for name, x in _layouts(base).items():
        before = np.array(x, copy=True)
        y = normlab.normalize(x, "b [d]", weight=weight, bias=bias, params="d")
        values = np.asarray(x, np.float64)
        centred = values - values.mean(axis=1, keepdims=True)
        expected = centred / np.sqrt((centred ** 2).mean(axis=1, keepdims=True) + 1e-5) * weight + bias
        np.testing.assert_allclose(np.asarray(y), expected, rtol=0, atol=1e-4 if dtype == np.float32 else 1e-12,
                                   err_msg=name)
        assert np.asarray(y).dtype == dtype, name
        np.testing.assert_array_equal(np.asarray(x), before, err_msg=name)



def _memory_kept_by(loop) -> int:
    """Bytes that ``loop()`` allocated and still holds once it returns (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loop()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_loop_over_many_sequence_lengths_keeps_no_memory_that_grows_with_the_inputs():
    """Each length of a variable-length loop leaves a fast call in the cache (4096 of
    them at most); what a call keeps must not grow with its rows, as a plan's scratch for
    the statistics nobody asked for (24 bytes a row) did: 17 MB after 64 sequences of
    lengths 1 to 150, gigabytes in a long run of long inputs."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal(16).astype(np.float32)
    inputs = [rng.standard_normal((64, length, 16)).astype(np.float32) for length in range(1, 151)]
    for x in (inputs[0], inputs[-1]):  # (Numba compiles on the first calls)
        normlab.normalize(x, "b t [d]", weight=weight, params="d")

    def loop():
        for x in inputs:
            normlab.normalize(x, "b t [d]", weight=weight, params="d")

    assert _memory_kept_by(loop) < 4 << 20
    x = inputs[-1].astype(np.float64)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(normlab.normalize(inputs[-1], "b t [d]", weight=weight, params="d"), expected,
                               rtol=0, atol=1e-5)
