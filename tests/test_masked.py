"""Masks and segments in the NumPy API, against oracles nobody here wrote the numbers of.

* a hypothesis property: a masked (or segmented) result equals the unmasked result on the
  data with the masked-out elements removed (statistics, each counted element's output
  and gradient);
* a masked batch norm composite in torch, differentiated by torch autograd (float64);
* Flax's definition for what the property cannot see: masked-out outputs use their
  group's statistics, and a group with nothing counted gives exactly ``bias``.
"""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normlab
from normlab import normalize, normalize_backward
from normlab.errors import NormlabError, ShapeError
from normlab.plan import make_plan

BACKENDS = ["numpy", "numba"]

# (pattern, shape, params, mask shape, sizes): masks that vary per element and broadcast ones
MASKED_CASES = [
    ("[b] c [t]", (3, 2, 5), "c", (3, 1, 5), {}),
    ("[b] c", (6, 3), "c", (6, 3), {}),
    ("b t [d]", (2, 3, 5), "d", (2, 3, 5), {}),
    ("b (g [c]) [h w]", (2, 4, 2, 3), "(g c)", (2, 1, 2, 3), {"g": 2}),
    ("b c [h w]", (2, 3, 2, 3), "c", (2, 3, 2, 3), {}),
    ("[b t] c", (2, 4, 3), "c", (2, 4, 1), {}),
]


def _groups(pattern, shape, sizes):
    """Per element: its group's flat index (from the plan, which the property checks)."""
    return make_plan(pattern, shape, **sizes).group_ids()


def _removed(x, counted, groups, index):
    """The counted elements of group ``index``, in order: the data with the rest removed."""
    keep = (groups == index) & counted
    return x[keep], keep


def _check_against_removed(x, pattern, params, mask, sizes, backend, rms, weight, bias, grad_y, groups,
                           ids=None, seg_kw=None):
    seg_kw = seg_kw or {}
    counted = np.broadcast_to(mask, x.shape) if mask is not None else np.ones(x.shape, bool)
    y, mean, rstd = normalize(x, pattern, weight=weight, bias=bias, params=params, rms=rms, return_stats=True,
                              backend=backend, mask=mask, **seg_kw, **sizes)
    plan = make_plan(pattern, x.shape, params, **sizes)
    w_full = np.broadcast_to(plan.expand_params(weight), plan.axis_sizes).reshape(x.shape)
    b_full = np.broadcast_to(plan.expand_params(bias), plan.axis_sizes).reshape(x.shape)
    g_counted = np.where(counted, grad_y, 0.0)  # outputs that are not counted carry no loss here
    gx, gw, gb = normalize_backward(g_counted, x, pattern, weight=weight, params=params, rms=rms, backend=backend,
                                    mask=mask, **seg_kw, **sizes)
    flat_mean = None if rms else mean.reshape(-1)
    for index in np.unique(groups):
        values, keep = _removed(x, counted, groups, index)
        if values.size == 0:
            continue
        sub_y, sub_mean, sub_rstd = normalize(values, "[n]", weight=w_full[keep], bias=b_full[keep], params="n",
                                              rms=rms, return_stats=True, backend="numpy")
        sub_gx, _, _ = normalize_backward(g_counted[keep], values, "[n]", weight=w_full[keep], params="n", rms=rms,
                                          backend="numpy")
        np.testing.assert_allclose(y[keep], sub_y, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(gx[keep], sub_gx, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(rstd.reshape(-1)[index], sub_rstd.reshape(()), rtol=1e-9)
        if not rms:
            np.testing.assert_allclose(flat_mean[index], sub_mean.reshape(()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_masked_result_equals_the_unmasked_result_on_the_data_with_masked_out_elements_removed(backend, data):
    pattern, shape, params, mask_shape, sizes = data.draw(st.sampled_from(MASKED_CASES))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rms = data.draw(st.booleans())
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.uniform(-100, 100)
    mask = rng.random(mask_shape) < data.draw(st.sampled_from([0.2, 0.6, 1.0]))
    plan = make_plan(pattern, shape, params, **sizes)
    weight, bias = rng.normal(size=plan.param_shape), rng.normal(size=plan.param_shape)
    _check_against_removed(x, pattern, params, mask, sizes, backend, rms, weight, bias, rng.normal(size=shape),
                           _groups(pattern, shape, sizes))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_segmented_result_equals_the_unmasked_result_on_each_segment_alone(backend, data):
    pattern, shape, params = data.draw(st.sampled_from([
        ("[n] c", (9, 3), "c"), ("[n c]", (9, 3), "c"), ("[n t] d", (6, 2, 3), "d"), ("[n] c", (40, 70), "c")]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, shape[0])
    if data.draw(st.booleans()):
        ids = np.sort(ids)  # the sorted fast path
    mask = rng.random((shape[0],) + (1,) * (len(shape) - 1)) < 0.7 if data.draw(st.booleans()) else None
    x = rng.normal(size=shape) + 5.0
    plan = make_plan(pattern, shape, params)
    weight, bias = rng.normal(size=plan.param_shape), rng.normal(size=plan.param_shape)
    # each element's group, as a flat index into statistics of shape (4, kept axes...)
    stats_shape = (4,) + plan.stats_shape[1:]
    groups = np.broadcast_to(np.arange(np.prod(stats_shape)).reshape(stats_shape)[ids], shape)
    y, mean, rstd = normalize(x, pattern, weight=weight, bias=bias, params=params, segment_ids=ids, mask=mask,
                              return_stats=True, backend=backend, num_segments=4)
    assert rstd.shape[0] == 4
    _check_against_removed(x, pattern, params, mask, {}, backend, False, weight, bias, rng.normal(size=shape),
                           groups, seg_kw={"segment_ids": ids, "num_segments": 4})


def _torch_masked_batch_norm(torch, x, mask, weight, bias, eps):
    """The common composite: masked sums for mean and variance, then normalize."""
    m = mask.to(x.dtype)
    count = m.sum(dim=(0, 2), keepdim=True)
    mean = (x * m).sum(dim=(0, 2), keepdim=True) / count
    var = (((x - mean) * m) ** 2).sum(dim=(0, 2), keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None] + bias[None, :, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_batch_norm_matches_a_torch_composite_and_its_autograd_everywhere(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 7)) * 2 + 10
    mask = rng.random((4, 1, 7)) < 0.6
    weight, bias, grad_y = rng.normal(size=3), rng.normal(size=3), rng.normal(size=x.shape)
    y, mean, _ = normalize(x, "[b] c [t]", weight=weight, bias=bias, params="c", mask=mask, return_stats=True,
                           backend=backend)
    gx, gw, gb = normalize_backward(grad_y, x, "[b] c [t]", weight=weight, params="c", mask=mask, backend=backend)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    ty = _torch_masked_batch_norm(torch, tx, torch.tensor(mask), tw, tb, 1e-5)
    ty.backward(torch.tensor(grad_y))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)  # masked-out outputs too
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(mean.reshape(-1), (x * mask).sum(axis=(0, 2)) / mask.sum(axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segmented", [False, True])
def test_the_bias_gradient_without_a_weight_matches_torch_autograd_with_a_mask_or_segments(backend, segmented):
    """params= without weight= asks for the bias gradient alone; with a mask or segments the
    kernels' tables came back (1, 1) and the reshape to the parameters' shape raised a bare
    ValueError ("cannot reshape array of size 1 into shape (1,3)")."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3, 7))
    mask = rng.random((4, 1, 7)) < 0.6
    grad_y = rng.normal(size=x.shape)
    counted = {"segment_ids": np.zeros(4, np.int64)} if segmented else {"mask": mask}  # one segment: every element
    gx, gw, gb = normalize_backward(grad_y, x, "[b] c [t]", params="c", backend=backend, **counted)
    tx, tb = torch.tensor(x, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ty = _torch_masked_batch_norm(torch, tx, torch.tensor(np.ones_like(mask) if segmented else mask),
                                  torch.ones(3, dtype=torch.float64), tb, 1e-5)
    ty.backward(torch.tensor(grad_y))
    assert gw is None
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_with_a_padding_mask_matches_torch_autograd_through_masked_sums(backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 6))
    mask = rng.random((2, 5, 6)) < 0.5
    grad_y = rng.normal(size=x.shape)
    tx = torch.tensor(x, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.float64)
    count = m.sum(-1, keepdim=True)
    mean = (tx * m).sum(-1, keepdim=True) / count
    var = (((tx - mean) * m) ** 2).sum(-1, keepdim=True) / count
    ((tx - mean) / torch.sqrt(var + 1e-5)).backward(torch.tensor(grad_y))
    gx, _, _ = normalize_backward(grad_y, x, "b t [d]", mask=mask, backend=backend)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_with_nothing_counted_gives_exactly_bias_zero_stats_and_zero_gradient(backend):
    x = np.arange(12.0).reshape(2, 6) + 0.5
    mask = np.array([[True] * 6, [False] * 6])
    bias = np.arange(6.0)
    y, mean, rstd = normalize(x, "b [d]", weight=np.full(6, 3.0), bias=bias, params="d", mask=mask,
                              return_stats=True, backend=backend)
    assert y[1].tolist() == bias.tolist()
    assert mean[1, 0] == 0.0 and rstd[1, 0] == 0.0
    gx, _, gb = normalize_backward(np.ones_like(x), x, "b [d]", weight=np.full(6, 3.0), params="d", mask=mask,
                                   backend=backend)
    assert gx[1].tolist() == [0.0] * 6
    assert gb.tolist() == [2.0] * 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern,shape,mask_shape", [("[b] c [t]", (5, 3, 8), (5, 1, 8)),
                                                      ("b [d]", (4, 9), (4, 9)), ("[b] c", (9, 3), (9, 1))])
def test_masked_numerics_contract_holds(backend, pattern, shape, mask_shape):
    rng = np.random.default_rng(5)
    mask = rng.random(mask_shape) < 0.6
    mask.reshape(-1)[0] = True
    # a constant counted group is exactly 0, whatever the masked-out values
    x = np.where(np.broadcast_to(mask, shape), 7.25, rng.normal(size=shape)).astype(np.float32)
    y = normalize(x, pattern, mask=mask, backend=backend)
    assert (y[np.broadcast_to(mask, shape)] == 0).all()
    # a large common offset costs no precision (float32 input, |mean|/std = 1e6)
    base = rng.normal(size=shape)
    y32 = normalize((base + 1e6).astype(np.float32), pattern, mask=mask, backend=backend)
    exact = normalize(((base + 1e6).astype(np.float32)).astype(np.float64), pattern, mask=mask, backend="numpy")
    assert np.abs(y32 - exact).max() < 1e-4
    # a NaN that does not count stays in its own element; one that counts stays in its group
    x = rng.normal(size=shape)
    x_nan = x.copy()
    uncounted = np.flatnonzero(~np.broadcast_to(mask, shape))
    x_nan.reshape(-1)[uncounted[0]] = np.nan
    y_nan = normalize(x_nan, pattern, mask=mask, backend=backend)
    assert np.isnan(y_nan).sum() == 1
    np.testing.assert_array_equal(np.delete(y_nan.reshape(-1), uncounted[0]),
                                  np.delete(normalize(x, pattern, mask=mask, backend=backend).reshape(-1),
                                            uncounted[0]))
    x_nan.reshape(-1)[uncounted[0]] = 0.0
    x_nan.reshape(-1)[0] = np.nan
    groups = make_plan(pattern, shape).group_ids()
    bad = np.isnan(normalize(x_nan, pattern, mask=mask, backend=backend))
    assert (bad == (groups == groups.reshape(-1)[0])).all()


def _with_threads(count, fn):
    before = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("pattern,shape,kw", [
    ("[b] c [t]", (16, 8, 33), {"mask": np.arange(33) % 3 > 0}),
    ("[n] c", (300, 70), {"segment_ids": np.repeat(np.arange(30), 10), "mask": (np.arange(300) % 7 > 0)[:, None]}),
    ("b [d]", (40, 65), {"mask": np.arange(65) % 4 > 0}),
])
def test_masked_kernels_give_the_same_bits_on_one_and_two_threads(pattern, shape, kw, every_call_threaded):
    rng = np.random.default_rng(6)
    x, grad_y = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    params = "c" if "c" in pattern.split() else "d"
    weight = rng.normal(size=make_plan(pattern, shape, params).param_shape)

    def run():
        y = normalize(x, pattern, weight=weight, params=params, backend="numba", **kw)
        return (y,) + normalize_backward(grad_y, x, pattern, weight=weight, params=params, backend="numba", **kw)

    for one, two in zip(_with_threads(1, run), _with_threads(2, run)):
        assert one.tobytes() == two.tobytes()


def test_bad_masks_and_segment_ids_fail_with_the_pattern_shape_and_a_fix():
    x = np.zeros((4, 3))
    with pytest.raises(NormlabError, match=r"\[b\] c.*boolean.*mask != 0"):
        normalize(x, "[b] c", mask=np.ones((4, 3)))
    with pytest.raises(NormlabError, match=r"\(4, 3\).*does not broadcast"):
        normalize(x, "[b] c", mask=np.ones((5, 3), bool))
    with pytest.raises(NormlabError, match=r"shape \(4,\)"):
        normalize(x, "[b] c", segment_ids=np.array([0, 1]))
    with pytest.raises(NormlabError, match="num_segments=2"):
        normalize(x, "[b] c", segment_ids=np.array([0, 1, 2, 2]), num_segments=2)
    with pytest.raises(NormlabError, match="segment_axis='c' is not a bracketed axis"):
        normalize(x, "[b] c", segment_ids=np.array([0, 1, 2]), segment_axis="c")
    with pytest.raises(NormlabError, match="negative"):
        normalize(x, "[b] c", segment_ids=np.array([0, -1, 2, 2]))


@pytest.mark.parametrize("ids, said, unsaid", [
    (np.array([0, 1]), "got shape (2,)", "dtype"),
    (np.array([[0, 1, 1, 0]]), "got shape (1, 4); pass segment_ids.reshape(-1)", "dtype"),
    (np.array([0.0, 1.0, 1.0, 0.0]), "got dtype float64; pass integer ids", "shape"),
    (np.array([0.0, 1.0]), "got dtype float64 and shape (2,)", "reshape"),
])
def test_segment_ids_are_told_only_what_is_wrong_with_them(ids, said, unsaid):
    # ids of the wrong shape were told their (right) dtype too, and the reverse
    with pytest.raises(ShapeError) as caught:
        normalize(np.zeros((4, 3)), "[b] c", segment_ids=ids)
    message = str(caught.value)
    assert "'[b] c'" in message and "(4, 3)" in message and said in message
    assert unsaid not in message.split(": ", 1)[1]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("argument, value, fix", [
    ("mask", np.ma.array(np.ones((4, 3), bool), mask=np.eye(4, 3, dtype=bool)), "mask.filled(False)"),
    ("segment_ids", np.ma.array([0, 0, 1, 1], mask=[0, 1, 0, 0]), "segment_ids.filled(id)"),
])
def test_a_mask_or_segment_ids_with_masked_elements_is_refused_as_every_other_argument_is(argument, value, fix,
                                                                                          backward):
    """np.asarray read the values under the np.ma mask as they were: the masked positions
    counted, or kept the id they hid, where x, weight, gate and the rest refuse such arrays."""
    x = np.arange(12.0).reshape(4, 3)
    call = (lambda **kw: normalize_backward(x, x, "[b] c", **kw)) if backward else (lambda **kw: normalize(x, "[b] c",
                                                                                                            **kw))
    with pytest.raises(NormlabError, match=rf"'\[b\] c', input shape \(4, 3\): {argument} is a masked array") as info:
        call(**{argument: value})
    assert fix in str(info.value)
    call(**{argument: np.ma.array(value.data)})  # with nothing masked it is an array like any other


@pytest.mark.parametrize("backend", ["auto", "numpy"])
@pytest.mark.parametrize("rms", [False, True], ids=["mean", "rms"])
@pytest.mark.parametrize("grouping, stats_shape", [({"mask": np.arange(12).reshape(4, 3) % 5 > 0}, (1, 3)),
                                                   ({"segment_ids": [0, 1, 1, 0]}, (2, 3))],
                         ids=["mask", "segments"])
def test_given_statistics_come_back_as_float64_arrays_of_the_statistics_shape(grouping, stats_shape, rms, backend):
    """With a mask or segments, return_stats=True handed back the caller's own objects (a
    list, a float32 array of the kept axes alone), where without them it gives float64 arrays
    of the statistics' shape."""
    x = np.arange(12.0).reshape(4, 3)
    mean, rstd = [1.0, 2.0, 3.0], np.float32([0.5, 1.0, 2.0])
    given = {"rstd": rstd} if rms else {"mean": mean, "rstd": rstd}
    y, got_mean, got_rstd = normalize(x, "[b] c", return_stats=True, rms=rms, backend=backend, **given, **grouping)
    assert isinstance(got_rstd, np.ndarray) and got_rstd.dtype == np.float64 and got_rstd.shape == stats_shape
    np.testing.assert_array_equal(got_rstd, np.broadcast_to(rstd.astype(np.float64), stats_shape))
    if rms:
        assert got_mean is None
    else:
        assert isinstance(got_mean, np.ndarray) and got_mean.dtype == np.float64 and got_mean.shape == stats_shape
        np.testing.assert_array_equal(got_mean, np.broadcast_to(mean, stats_shape))


def test_segment_axis_names_which_bracketed_axis_the_ids_run_along():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 4))
    ids = np.array([0, 0, 1, 1])
    y, mean, _ = normalize(x, "[b] c [t]", segment_ids=ids, segment_axis="t", return_stats=True)
    assert mean.shape == (1, 3, 2)
    for s in (0, 1):
        part = x[:, :, ids == s]
        np.testing.assert_allclose(y[:, :, ids == s], normalize(part, "[b] c [t]"), atol=1e-12)


@pytest.mark.parametrize("axis", [np.array(["n", "c"]), np.array([True, False]), np.array("n"), 0],
                         ids=["two names", "bools", "0-d", "int"])
@pytest.mark.parametrize("function", ["normalize", "normalize_backward"])
def test_a_segment_axis_that_is_not_a_str_is_an_input_error_naming_the_bracketed_axes(function, axis):
    # an array was compared elementwise with the axis names: NumPy's "truth value of an array ...
    # is ambiguous" escaped as a bare ValueError
    x = np.random.default_rng(0).normal(size=(6, 4))
    args = (x, "[n] c") if function == "normalize" else (np.ones_like(x), x, "[n] c")
    with pytest.raises(NormlabError) as info:
        getattr(normlab, function)(*args, segment_ids=np.array([0, 0, 1, 1, 1, 2]), segment_axis=axis)
    for word in ("segment_axis", "as a str", "pass one of 'n'", "'[n] c'", "(6, 4)"):
        assert word in str(info.value)


@pytest.mark.parametrize("count", [True, np.True_, False])
def test_a_boolean_num_segments_is_an_input_error_not_a_count_of_one(count):
    # True was read as 1: refused as "num_segments=1 but segment_ids reach 1", or taken where the ids
    # were all 0
    x = np.random.default_rng(0).normal(size=(4, 3))
    for ids in (np.array([0, 0, 1, 1]), np.zeros(4, np.int64)):
        with pytest.raises(NormlabError) as info:
            normalize(x, "[n] c", segment_ids=ids, num_segments=count)
        assert f"num_segments must be an int, got {count!r}" in str(info.value) and "'[n] c'" in str(info.value)


def test_masked_inputs_are_not_modified():
    x = np.arange(12.0).reshape(3, 4)
    mask = np.array([True, False, True])[:, None]
    before = x.copy()
    normalize(x, "[b] c", mask=mask)
    normalize_backward(np.ones_like(x), x, "[b] c", mask=mask)
    assert (x == before).all()


def test_masks_with_fused_options_fail_with_a_fix():
    with pytest.raises(NormlabError, match="separate normalize call"):
        normalize(np.zeros((2, 3)), "b [d]", mask=np.ones((2, 3), bool), residual=np.zeros((2, 3)))
