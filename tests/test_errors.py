"""Bad input fails with a ValueError subclass that repeats the pattern and the shape and
says how to fix it, and leaves the input alone."""

import numpy as np
import pytest

import normlab
from normlab import functional as NF
from normlab.errors import InputError, NormlabError, ParamsError, PatternSyntaxError, ShapeError

X = np.arange(24.0).reshape(2, 3, 4)


def _raises(kind, call, *fragments):
    with pytest.raises(kind) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, NormlabError)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return info.value


def test_a_syntax_error_in_normalize_shows_a_caret():
    err = _raises(PatternSyntaxError, lambda: normlab.normalize(X, "b [c h"), "never closed")
    assert str(err).endswith("    b [c h\n      ^")


def test_a_rank_mismatch_names_pattern_and_shape():
    _raises(ShapeError, lambda: normlab.normalize(X, "b [d]"), "'b [d]'", "(2, 3, 4)", "names 2 axes")


def test_an_indivisible_group_names_pattern_and_shape():
    _raises(ShapeError, lambda: normlab.normalize(X, "b (g [c]) [s]", g=2), "'b (g [c]) [s]'", "(2, 3, 4)",
            "not divisible by 2")


def test_a_weight_without_params_suggests_the_params_to_pass():
    _raises(ParamsError, lambda: normlab.normalize(X, "b [c s]", weight=np.ones(3)), "params='c'", "(2, 3, 4)")


def test_a_weight_of_the_wrong_shape_says_which_shape_fits():
    _raises(ParamsError, lambda: normlab.normalize(X, "b [c s]", weight=np.ones(4), params="c"), "(3,)", "(4,)")


def test_a_bias_of_the_wrong_shape_is_an_error_too():
    _raises(ParamsError, lambda: normlab.normalize(X, "b [c s]", bias=np.ones((3, 1)), params="c"), "bias")


def test_params_naming_a_missing_axis_is_an_error():
    _raises(ParamsError, lambda: normlab.normalize(X, "b [c s]", weight=np.ones(3), params="q"), "'q'")


def test_complex_input_is_refused_with_a_cast_to_suggest():
    _raises(InputError, lambda: normlab.normalize(X.astype(complex), "b [c s]"), "astype", "(2, 3, 4)")


def test_object_input_is_refused():
    _raises(InputError, lambda: normlab.normalize(np.array([["a", "b"]]), "b [d]"), "not supported")


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf"), "small"])
def test_a_bad_eps_is_refused(eps):
    _raises(InputError, lambda: normlab.normalize(X, "b [c s]", eps=eps), "eps")


def test_out_of_the_wrong_dtype_or_shape_is_refused():
    _raises(InputError, lambda: normlab.normalize(X, "b [c s]", out=np.empty((2, 3, 4), np.float32)), "float64")
    _raises(InputError, lambda: normlab.normalize(X, "b [c s]", out=np.empty((2, 12))), "(2, 3, 4)")
    _raises(InputError, lambda: normlab.normalize(X, "b [c s]", out=[0.0] * 24), "NumPy array")


def test_mean_without_rstd_is_refused():
    _raises(InputError, lambda: normlab.normalize(X, "b [c s]", mean=np.zeros(2)), "both mean and rstd")


def test_statistics_of_the_wrong_size_are_refused():
    _raises(ShapeError, lambda: normlab.normalize(X, "b [c s]", mean=np.zeros(3), rstd=np.ones(3)), "(2, 1, 1)")


def test_a_gradient_of_the_wrong_shape_is_refused():
    _raises(ShapeError, lambda: normlab.normalize_backward(np.ones((2, 3)), X, "b [c s]"), "grad_y", "(2, 3, 4)")


def test_an_unknown_backend_is_refused():
    _raises(InputError, lambda: normlab.normalize(X, "b [c s]", backend="cuda"), "backend")


def test_layer_norm_with_a_mismatched_normalized_shape_says_what_fits():
    _raises(ShapeError, lambda: NF.layer_norm(X, (3,)), "normalized_shape=(4,)", "(2, 3, 4)")


def test_group_norm_with_groups_not_dividing_channels_is_refused():
    _raises(ShapeError, lambda: NF.group_norm(X, 2), "num_groups=2", "3 channels", "(2, 3, 4)")


@pytest.mark.parametrize("axis", [0, 3, -4])
def test_batch_norm_on_the_batch_axis_or_outside_the_input_is_refused(axis):
    _raises(ShapeError, lambda: NF.batch_norm(X, None, None, training=True, axis=axis), f"axis={axis}", "(2, 3, 4)")


def test_running_statistics_must_be_writable_arrays_of_one_value_per_channel():
    _raises(ShapeError, lambda: NF.batch_norm(X, np.zeros(4), np.ones(3), training=True), "running_mean", "(3,)")
    _raises(InputError, lambda: NF.batch_norm(X, [0.0] * 3, np.ones(3), training=True), "in place")


def test_evaluation_without_running_statistics_is_refused():
    _raises(InputError, lambda: NF.batch_norm(X, None, None, training=False), "training=False")


def test_a_momentum_or_eps_that_is_no_number_is_refused():
    for momentum in (None, "0.1"):  # torch takes any float, in [0, 1] or not, and refuses these
        _raises(InputError, lambda: NF.batch_norm(X, np.zeros(3), np.ones(3), training=True, momentum=momentum),
                "momentum", repr(momentum))
    _raises(InputError, lambda: NF.layer_norm(X, 4, eps="small"), "eps", "'small'")


@pytest.mark.parametrize("momentum", [None, "a", [0.1]])
@pytest.mark.parametrize("call", [
    lambda momentum: NF.instance_norm(X, momentum=momentum),
    lambda momentum: NF.instance_norm(X[:0], momentum=momentum),
    lambda momentum: NF.instance_norm(X, np.zeros(3), np.ones(3), use_input_stats=False, momentum=momentum),
    lambda momentum: NF.batch_norm(X, np.zeros(3), np.ones(3), training=False, momentum=momentum),
], ids=["instance_norm without running statistics", "instance_norm of an empty batch",
        "instance_norm from running statistics", "batch_norm in evaluation"])
def test_a_momentum_that_is_no_number_is_refused_where_no_running_statistics_move(call, momentum):
    """torch.nn.functional's argument parser refuses it in every call, whether or not the
    running statistics move; normlab refused it only where it updated them."""
    _raises(InputError, lambda: call(momentum), "momentum", repr(momentum))


def test_batch_norm_refuses_the_eps_torch_refuses():
    _raises(InputError, lambda: NF.batch_norm(X, np.zeros(3), np.ones(3), training=True, eps=0.0),
            "eps must be positive in training", "(2, 3, 4)")
    _raises(InputError, lambda: NF.batch_norm(X, np.zeros(3), np.ones(3), eps=-1e-3), "positive or zero")


def test_a_failed_call_leaves_the_running_statistics_untouched():
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(NormlabError):
        NF.batch_norm(X, rm, rv, weight=np.ones(4), training=True)
    np.testing.assert_array_equal(rm, np.zeros(3))
    np.testing.assert_array_equal(rv, np.ones(3))


def test_every_error_survives_pickling_as_a_worker_process_hands_it_to_its_pool():
    # multiprocessing and concurrent.futures pickle a worker's exception; one that cannot be
    # unpickled broke the pool (BrokenProcessPool) instead of raising in the caller
    import pickle

    with pytest.raises(PatternSyntaxError) as info:
        normlab.normalize(np.zeros((2, 3)), "b [c")
    errors = [info.value, ShapeError("s"), ParamsError("p"), InputError("i"), NormlabError("n")]
    for err in errors:
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.pattern, again.position) == ("b [c", 2)


def test_numpys_out_and_where_passed_as_sizes_are_named_by_shape_with_normlabs_way():
    """normalize_backward(..., out=g) and normalize(..., where=m), NumPy's keywords, land among
    the axis sizes; the message printed the whole array (lines of it) and offered only "use
    one of b, c, h, or drop it"."""
    big = np.zeros((64, 3, 4))
    err = _raises(ShapeError, lambda: normlab.normalize_backward(np.ones_like(big), big, "b c [h]", out=big),
                  "out, an array of shape (64, 3, 4), names no axis", "takes no out=", "input shape (64, 3, 4)")
    assert "array(" not in str(err) and len(str(err)) < 300
    _raises(ShapeError, lambda: normlab.normalize(big, "b c [h]", where=big > 0),
            "where, an array of shape (64, 3, 4), names no axis", "is normlab's mask=")


@pytest.mark.parametrize("call", [
    lambda x, g: normlab.normalize(x, "b (g [c])", g=g),
    lambda x, g: normlab.normalize(x, "b (g [c])", g=g, backend="numpy"),
    lambda x, g: normlab.normalize_backward(x, x, "b (g [c])", g=g),
    lambda x, g: normlab.normalize(x, "b (g [c])", g=g, mask=np.ones(x.shape, bool)),
], ids=["numba", "numpy", "backward", "mask"])
@pytest.mark.parametrize("g", [2**61, 2**63])
def test_a_factor_of_an_empty_axis_too_large_for_an_array_is_a_shape_error(call, g):
    """An empty axis splits into factors of any size (the other is 0), but the statistics keep
    them: NumPy failed inside ("array is too big", "Maximum allowed dimension exceeded")."""
    _raises(ShapeError, lambda: call(np.ones((2, 0)), g), "'b (g [c])'", "input shape (2, 0)", "sizes that fit")


@pytest.mark.parametrize("call", [
    lambda p, params: normlab.normalize(X, p, params=params),
    lambda p, params: normlab.normalize(X, p, params=params, backend="numpy", return_stats=True),
    lambda p, params: normlab.normalize_backward(X, X, p, params=params),
    lambda p, params: normlab.normalize(X, p, params=params, mask=X > 3),
    lambda p, params: normlab.normalize(X, p, params=params, segment_ids=[0, 1]),
    lambda p, params: normlab.normalize(X, p, params=params, residual=X),
], ids=["numba", "numpy", "backward", "mask", "segments", "residual"])
@pytest.mark.parametrize("pattern, params", [("b [c h", None), ("b [c] h", "(c")])
def test_a_syntax_error_names_the_input_shape_and_the_pattern_beside_its_caret(call, pattern, params):
    """A pattern or params syntax error showed the text and a caret, but not the input shape,
    and a params error not the pattern it goes with."""
    err = _raises(PatternSyntaxError, lambda: call(pattern, params), f"pattern {pattern!r}", "input shape (2, 3, 4)")
    assert str(err).endswith("^")


@pytest.mark.parametrize("call", [
    lambda backend: normlab.normalize(X, "b [c h]", backend=backend),
    lambda backend: normlab.normalize(X, "b [c h]", backend=backend, mask=X > 3),
    lambda backend: normlab.normalize(X, "b [c h]", backend=backend, residual=X),
    lambda backend: normlab.normalize_backward(X, X, "b [c h]", backend=backend),
    lambda backend: normlab.normalize_backward(X, X, "b [c h]", backend=backend, segment_ids=[0, 0, 1]),
    lambda backend: normlab.normalize_backward(X, X, "b [c h]", backend=backend, residual=X),
], ids=["forward", "mask", "residual", "backward", "backward-segments", "backward-residual"])
@pytest.mark.parametrize("backend", ["cuda", np.array(["numba", "numpy"]), 10**400], ids=["name", "array", "huge-int"])
def test_an_unknown_backend_names_the_pattern_and_shape_and_the_backends_there_are(call, backend):
    """The message named neither the pattern nor the shape (and printed all 401 digits of
    10**400); an array of names failed inside with NumPy's "truth value ... is ambiguous"."""
    err = _raises(InputError, lambda: call(backend), "'b [c h]'", "(2, 3, 4)", "backend must be one of auto, numba, numpy")
    assert len(str(err)) < 200


@pytest.mark.parametrize("call", [
    lambda offset: normlab.normalize(X, "b [c h]", weight_offset=offset),
    lambda offset: normlab.normalize(X, "b [c h]", weight_offset=offset, backend="numpy"),
    lambda offset: normlab.normalize_backward(X, X, "b [c h]", weight_offset=offset),
], ids=["numba", "numpy", "backward"])
@pytest.mark.parametrize("offset", [10**400, -10**400])
def test_a_weight_offset_beyond_floats_range_is_an_input_error(call, offset):
    """An int too large for a float escaped as float()'s OverflowError."""
    err = _raises(InputError, lambda: call(offset), "'b [c h]'", "(2, 3, 4)", "too large for a float")
    assert len(str(err)) < 300


@pytest.mark.parametrize("call", [
    lambda given: normlab.normalize(X, "b [c] h", mean=given, rstd=given),
    lambda given: normlab.normalize(X, "b [c] h", rms=True, rstd=given, backend="numpy"),
    lambda given: normlab.normalize_backward(X, X, "b [c] h", mean=given, rstd=given),
    lambda given: normlab.normalize(X, "b [c] h", mean=given, rstd=given, mask=X > 3),
    lambda given: normlab.normalize(X, "b [c] h", mean=given, rstd=given, residual=X),
], ids=["forward", "rms-numpy", "backward", "mask", "residual"])
@pytest.mark.parametrize("dtype", ["complex128", "datetime64[s]", "U8", "object"])
def test_given_statistics_that_are_not_real_numbers_are_refused(call, dtype):
    """mean= and rstd= were cast to float64 as they came: complex ones lost their imaginary
    part with only a ComplexWarning, dates became their integer counts, strings were parsed
    and object arrays read, where weight and bias of those dtypes are refused."""
    given = np.ones((2, 1, 4)).astype(dtype)
    _raises(InputError, lambda: call(given), "'b [c] h'", "(2, 3, 4)", f"has dtype {given.dtype}", "real numbers")


@pytest.mark.parametrize("extra", [{}, dict(residual=np.ones((2, 3, 4))), dict(mask=np.ones((2, 3, 4), bool))],
                         ids=["plain", "fused", "masked"])
@pytest.mark.parametrize("grad_y, got", [(None, "grad_y is None"), (np.ones(4), "grad_y has shape (4,)")])
def test_a_gradient_of_the_wrong_shape_or_none_is_told_what_to_pass(extra, grad_y, got):
    # the message said "grad_y has shape (); it must match x", with no word of what grad_y is
    with pytest.raises(ShapeError) as info:
        normlab.normalize_backward(grad_y, np.ones((2, 3, 4)), "b t [d]", **extra)
    for words in ("'b t [d]'", "(2, 3, 4)", got, "pass the gradient of y", "np.ones_like(x)"):
        assert words in str(info.value)


def test_a_grad_sum_of_the_wrong_shape_is_told_what_to_pass():
    x = np.ones((2, 3, 4))
    with pytest.raises(ShapeError) as info:
        normlab.normalize_backward(x, x, "b t [d]", residual=x, grad_sum=np.ones(3))
    for words in ("'b t [d]'", "(2, 3, 4)", "grad_sum has shape (3,)", "the returned x + residual",
                  "(x + residual).sum()"):
        assert words in str(info.value)


@pytest.mark.parametrize("call", [
    lambda x, ids: normlab.normalize(x, "[n] d", segment_ids=ids),
    lambda x, ids: normlab.normalize_backward(x, x, "[n] d", segment_ids=ids),
], ids=["normalize", "normalize_backward"])
@pytest.mark.parametrize("ids, fix", [
    ("001111", "np.array(list(segment_ids), np.int64)"),
    ([[0.5, 1.5]], "pass an integer array of 6 ids"),
], ids=["str", "floats of another shape"])
def test_segment_ids_of_neither_dtype_nor_shape_are_told_what_to_pass(call, ids, fix):
    # the message said what was wrong ("must be integers of shape (6,) ... got dtype <U6 and
    # shape ()") and stopped there
    x = np.arange(12.0).reshape(6, 2)
    with pytest.raises(ShapeError) as info:
        call(x, ids)
    assert "'[n] d'" in str(info.value) and "(6, 2)" in str(info.value) and fix in str(info.value)
    if isinstance(ids, str):  # the fix it gives works
        assert np.array_equal(np.array(list(ids), np.int64), [0, 0, 1, 1, 1, 1])
