"""Properties of the NumPy API under hypothesis: any pattern text, shape, size keyword and
array either computes or fails with a :class:`normlab.NormlabError` (a ``ValueError``) whose
message repeats the pattern and the input shape, and never modifies its input."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab
from normlab.errors import NormlabError

# names include normalize's own keywords, which only the sizes= mapping can size
NAMES = ("a", "b", "c", "g", "h", "w", "x", "eps", "rms", "sizes", "weight", "mean", "pattern", "_", "A0")
# sizes a user may pass by mistake, huge ones among them (a factor of an empty axis takes any size)
ODD_SIZES = (0, -1, 2.0, True, np.int64(2), 2**40, 2**62, 2**63, 10**30)


@st.composite
def pattern_and_shape(draw):
    """A pattern drawn from the grammar (repeated names, '...' anywhere, compositions with
    brackets inside) with a shape that mostly fits it, and sizes for its factors."""
    used, items, shape, sizes = [], [], [], {}

    def name():
        if used and draw(st.integers(0, 9)) == 0:
            return draw(st.sampled_from(used))  # a repeated name
        used.append(draw(st.sampled_from(NAMES)))
        return used[-1]

    def composition(reduced_inner):
        factors = [name() for _ in range(draw(st.integers(1, 3)))]
        sizes_drawn = [draw(st.integers(0, 4)) for _ in factors]
        shape.append(math.prod(sizes_drawn))
        if shape[-1] == 0 and draw(st.booleans()):  # an empty axis: its other factors may take any size
            sizes_drawn = [draw(st.sampled_from(ODD_SIZES)) if s else s for s in sizes_drawn]
        sizes.update({f: s for f, s in zip(factors[1:], sizes_drawn[1:])})
        if reduced_inner:
            return "(" + factors[0] + " [" + " ".join(factors[1:]) + "])"
        return "(" + " ".join(factors) + ")"

    def item(inside_brackets):
        kind = draw(st.sampled_from(["name", "name", "...", "()", "[]", "([])"] if not inside_brackets
                                    else ["name", "...", "()"]))
        if kind == "name":
            shape.append(draw(st.integers(0, 5)))
            return name()
        if kind == "...":
            shape.extend(draw(st.lists(st.integers(0, 4), max_size=3)))
            return "..."
        if kind == "()":
            return composition(False)
        if kind == "([])":
            return composition(True)
        return "[" + " ".join(item(True) for _ in range(draw(st.integers(0, 3)))) + "]"

    text = " ".join(item(False) for _ in range(draw(st.integers(1, 5))))
    if draw(st.integers(0, 4)) == 0:
        shape = draw(st.lists(st.integers(0, 6), max_size=6))
    for used_name in used:
        if draw(st.integers(0, 5)) == 0:
            sizes[used_name] = draw(st.sampled_from(ODD_SIZES))
    return text, tuple(shape), sizes


CALLS = {
    "forward": lambda x, p, s: normlab.normalize(x, p, sizes=s, return_stats=True),
    "numpy": lambda x, p, s: normlab.normalize(x, p, sizes=s, backend="numpy", rms=True, return_stats=True),
    "backward": lambda x, p, s: normlab.normalize_backward(np.ones(x.shape, np.float32), x, p, sizes=s),
    "mask": lambda x, p, s: normlab.normalize(x, p, sizes=s, mask=np.arange(x.size).reshape(x.shape) % 3 > 0),
    "segments": lambda x, p, s: normlab.normalize(x, p, sizes=s, segment_ids=np.arange(64) % 2),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@settings(max_examples=150, deadline=None)
@given(case=pattern_and_shape())
def test_any_pattern_computes_or_fails_with_a_normlab_error_naming_pattern_and_shape(call, case):
    text, shape, sizes = case
    x = (np.arange(math.prod(shape)) % 7).reshape(shape).astype(np.float32)
    before = x.tobytes()
    try:
        CALLS[call](x, text, sizes)
    except NormlabError as err:
        message = str(err)
        shown = re.sub(r"\s", " ", text)
        assert repr(text) in message or shown in message, message
        assert str(shape) in message, message
    assert x.tobytes() == before


# ---- results against a float64 NumPy two-pass formula ------------------------------------

# odd sizes and sizes around the kernels' SIMD widths, so that vector loops leave tails
SIZES = (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 33)


@st.composite
def grouped_case(draw):
    """A pattern of named axes, one of them maybe split ``(g [c])``-style and a leading
    ``...`` maybe kept or reduced, with its expanded shape and which expanded axes reduce."""
    rank = draw(st.integers(1, 4))
    names = "abcd"[:rank]
    split = draw(st.integers(-1, rank - 1))
    tokens, shape, expanded, reduced, sizes = [], [], [], [], {}
    for i, name in enumerate(names):
        size = draw(st.sampled_from(SIZES))
        if i == split:
            groups, outer_reduced, inner_reduced = draw(st.sampled_from((1, 2, 3))), draw(st.booleans()), draw(st.booleans())
            outer = f"[g{name}]" if outer_reduced else f"g{name}"
            tokens.append(f"({outer} {f'[{name}]' if inner_reduced else name})")
            sizes[f"g{name}"] = groups
            shape.append(groups * size)
            expanded += [groups, size]
            reduced += [outer_reduced, inner_reduced]
        else:
            is_reduced = draw(st.booleans())
            tokens.append(f"[{name}]" if is_reduced else name)
            shape.append(size)
            expanded.append(size)
            reduced.append(is_reduced)
    if draw(st.booleans()):
        leading = draw(st.lists(st.sampled_from((1, 2, 3)), max_size=2))
        leading_reduced = draw(st.booleans())
        tokens.insert(0, "[...]" if leading_reduced else "...")
        shape, expanded, reduced = leading + shape, leading + expanded, [leading_reduced] * len(leading) + reduced
    if not any(reduced):
        tokens[-1] = tokens[-1] if tokens[-1].startswith("[") else f"[{tokens[-1]}]"
        reduced[-1] = True
        if tokens[-1].startswith("[("):  # the whole composition reduced
            reduced[-2] = True
    params = draw(st.sampled_from((None,) + tuple(names)))
    return " ".join(tokens), tuple(shape), tuple(expanded), tuple(reduced), sizes, params


def two_pass(x, expanded, reduced, eps, rms):
    """The float64 textbook formula: mean first, then the mean of squared deviations."""
    x = np.asarray(x, dtype=np.float64).reshape(expanded)
    axes = tuple(i for i, r in enumerate(reduced) if r)
    if rms:
        return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
    centred = x - np.mean(x, axis=axes, keepdims=True)
    return centred / np.sqrt(np.mean(centred * centred, axis=axes, keepdims=True) + eps)


def laid_out(x, layout):
    """``x`` as a view of another memory layout, the same values."""
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "reversed":
        return np.flip(np.flip(x).copy())
    if layout == "strided":
        wider = np.empty((2,) + x.shape, x.dtype)
        wider[0] = x
        return wider[0]
    if layout == "big-endian":
        return x.astype(x.dtype.newbyteorder(">"))
    return x


TOLERANCE = {np.float16: 3e-3, np.float32: 1e-4, np.float64: 1e-9}


@settings(max_examples=80, deadline=None)
@given(case=grouped_case(), dtype=st.sampled_from(sorted(TOLERANCE, key=str)), rms=st.booleans(),
       backend=st.sampled_from(["auto", "numpy"]), layout=st.sampled_from(["c", "fortran", "reversed", "strided",
                                                                            "big-endian"]),
       seed=st.integers(0, 2**32 - 1), offset=st.sampled_from([0.0, 3.0, -1e6]))
def test_the_result_is_the_float64_two_pass_formula_for_any_grouping_dtype_and_layout(case, dtype, rms, backend,
                                                                                        layout, seed, offset):
    text, shape, expanded, reduced, sizes, params = case
    rng = np.random.default_rng(seed)
    if dtype is np.float16:
        offset = min(abs(offset), 3.0)  # float16 holds 1e6 only to the nearest 512
    x = laid_out((rng.standard_normal(shape) + offset).astype(dtype), layout)
    before = x.tobytes()
    kwargs = {}
    if params is not None:
        plan = normlab.make_plan(text, shape, params, sizes=sizes)
        weight = rng.standard_normal(plan.param_shape).astype(dtype)
        bias = rng.standard_normal(plan.param_shape).astype(dtype)
        kwargs = dict(weight=weight, bias=bias, params=params)
    y = normlab.normalize(x, text, rms=rms, backend=backend, sizes=sizes, **kwargs)
    want = two_pass(x, expanded, reduced, 1e-5, rms)
    if params is not None:
        want = want * plan.expand_params(weight.astype(np.float64)) + plan.expand_params(bias.astype(np.float64))
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    # (the formula's own mean is off by rounding of about |offset| * 2e-16 in float64: the reference is too)
    tolerance = TOLERANCE[dtype] + 1e-14 * abs(offset)
    np.testing.assert_allclose(y.astype(np.float64), want.reshape(shape), rtol=tolerance, atol=tolerance)
    assert x.tobytes() == before


@settings(max_examples=60, deadline=None)
@given(case=grouped_case(), dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       backend=st.sampled_from(["auto", "numpy"]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_constant_groups_give_exactly_the_bias_and_a_nan_stays_in_its_group(case, dtype, backend, seed, data):
    text, shape, expanded, reduced, sizes, params = case
    rng = np.random.default_rng(seed)
    x = np.full(shape, data.draw(st.sampled_from([0.0, 2.5, -7.0, 1e4])), dtype)
    bias_kwargs = {}
    if params is not None:
        plan = normlab.make_plan(text, shape, params, sizes=sizes)
        bias = rng.standard_normal(plan.param_shape).astype(dtype)
        bias_kwargs = dict(weight=rng.standard_normal(plan.param_shape).astype(dtype), bias=bias, params=params)
        want = np.broadcast_to(plan.expand_params(bias), expanded).reshape(shape)
    else:
        want = np.zeros(shape, dtype)
    y = normlab.normalize(x, text, backend=backend, sizes=sizes, **bias_kwargs)
    assert np.array_equal(y, want)  # bit for bit: 0 (or the bias) in every constant group

    poisoned = rng.standard_normal(shape).astype(dtype)
    where = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    poisoned[where] = np.nan
    y = normlab.normalize(poisoned, text, backend=backend, sizes=sizes)
    # the oracle's NaNs: exactly the poisoned element's group
    assert np.array_equal(np.isnan(y), np.isnan(two_pass(poisoned, expanded, reduced, 1e-5, False).reshape(shape)))


@settings(max_examples=60, deadline=None)
@given(rank=st.integers(1, 4), data=st.data())
def test_permuting_the_axes_of_pattern_and_input_permutes_the_result(rank, data):
    names = "abcd"[:rank]
    shape = tuple(data.draw(st.sampled_from(SIZES)) for _ in names)
    reduced = [data.draw(st.booleans()) for _ in names]
    reduced[data.draw(st.integers(0, rank - 1))] = True
    order = data.draw(st.permutations(range(rank)))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    rms, backend = data.draw(st.booleans()), data.draw(st.sampled_from(["auto", "numpy"]))
    spanned = data.draw(st.sampled_from((None,) + tuple(range(rank))))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape).astype(dtype)
    kwargs = {}
    if spanned is not None:
        kwargs = dict(weight=rng.standard_normal(shape[spanned]).astype(dtype),
                      bias=rng.standard_normal(shape[spanned]).astype(dtype), params=names[spanned])

    def written(axes):
        return " ".join(f"[{names[i]}]" if reduced[i] else names[i] for i in axes)

    y = normlab.normalize(x, written(range(rank)), rms=rms, backend=backend, **kwargs)
    permuted = normlab.normalize(np.transpose(x, order), written(order), rms=rms, backend=backend, **kwargs)
    # the same sums in another order: equal to their rounding
    tolerance = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(permuted, np.transpose(y, order), rtol=tolerance, atol=tolerance)


@pytest.mark.slow  # (torch's import and autograd: about 6 s on one core)
@settings(max_examples=40, deadline=None)
@given(case=grouped_case(), dtype=st.sampled_from([np.float32, np.float64]), rms=st.booleans(),
       backend=st.sampled_from(["auto", "numpy"]), seed=st.integers(0, 2**32 - 1), counted=st.sampled_from([1.0, 0.7, 0.2]),
       given_stats=st.booleans())
def test_masked_gradients_are_torch_autograds_of_the_masked_definition_for_any_grouping(case, dtype, rms, backend,
                                                                                          seed, counted, given_stats):
    """normalize_backward(mask=...) against torch autograd through masked means (a group with
    nothing counted gives exactly the bias, so no gradient), with the statistics recomputed
    or given as return_stats gave them."""
    torch = pytest.importorskip("torch")
    text, shape, expanded, reduced, sizes, params = case
    rng = np.random.default_rng(seed)
    x, grad_y = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    mask = rng.random(shape) < counted
    options = {}
    if params is not None:
        plan = normlab.make_plan(text, shape, params, sizes=sizes)
        options = dict(weight=rng.standard_normal(plan.param_shape).astype(dtype), params=params)
    if given_stats:
        _, mean, rstd = normlab.normalize(x, text, rms=rms, sizes=sizes, mask=mask, return_stats=True, backend=backend)
        options.update(rstd=rstd) if rms else options.update(mean=mean, rstd=rstd)
    grad_x, grad_w, _ = normlab.normalize_backward(grad_y, x, text, rms=rms, backend=backend, sizes=sizes, mask=mask,
                                                   **options)

    axes = tuple(i for i, r in enumerate(reduced) if r)
    xt = torch.tensor(x.astype(np.float64).reshape(expanded), requires_grad=True)
    mt = torch.tensor(mask.reshape(expanded), dtype=torch.float64)
    count = mt.sum(axes, keepdim=True)

    def masked_mean(values):
        return (values * mt).sum(axes, keepdim=True) / count.clamp(min=1)

    if rms:
        yt = xt * torch.rsqrt(masked_mean(xt * xt) + 1e-5)
    else:
        centred = xt - masked_mean(xt)
        yt = centred * torch.rsqrt(masked_mean(centred * centred) + 1e-5)
    yt = torch.where(count > 0, yt, torch.zeros_like(yt))
    if params is not None:
        wt = torch.tensor(plan.expand_params(options["weight"].astype(np.float64)), requires_grad=True)
        yt = yt * wt
    yt.backward(torch.tensor(grad_y.astype(np.float64).reshape(expanded)))
    tolerance = {np.float32: 2e-3, np.float64: 1e-8}[dtype]
    np.testing.assert_allclose(grad_x, xt.grad.numpy().reshape(shape), rtol=tolerance, atol=tolerance)
    if params is not None:
        np.testing.assert_allclose(grad_w, plan.collapse_params(wt.grad.numpy()), rtol=tolerance, atol=10 * tolerance)


_GIVEN_STATISTICS_PATHS = {
    "plain": ({}, (4, 1)),
    "mask": ({"mask": np.arange(24).reshape(4, 6) % 5 > 0}, (4, 1)),
    "segments": ({"segment_ids": np.array([0, 0, 1, 1, 2, 2]), "segment_axis": "f"}, (4, 3)),
    "fused": ({"residual": np.ones((4, 6))}, (4, 1)),
}


@given(path=st.sampled_from(sorted(_GIVEN_STATISTICS_PATHS)), rms=st.booleans(),
       form=st.sampled_from(["statistics' shape", "kept axes", "broadcast", "scalar"]),
       dtype=st.sampled_from([np.float64, np.float32]), backend=st.sampled_from(["auto", "numpy"]))
def test_given_statistics_come_back_as_new_writable_arrays_on_every_path(path, rms, form, dtype, backend):
    """return_stats=True with mean= and rstd= given: every path hands the statistics back as
    computed ones come, float64 arrays of the statistics' shape that the caller may write and
    keep. A float64 array of that shape came back as the caller's own object, and one of
    another shape (a scalar, (1, 1), the kept axes of a segmented call) as a read-only
    broadcast view of its memory, so writing to the result failed or changed the argument."""
    grouping, shape = _GIVEN_STATISTICS_PATHS[path]
    x = np.arange(24.0).reshape(4, 6) % 7
    values = {"statistics' shape": np.full(shape, 2.0), "kept axes": np.full(shape[:1] + (1,) * (len(shape) - 1), 2.0),
              "broadcast": np.full((1, 1), 2.0), "scalar": np.array(2.0)}[form].astype(dtype)
    given = {"rstd": values} if rms else {"mean": values, "rstd": values.copy()}
    before = {name: value.copy() for name, value in given.items()}
    result = normlab.normalize(x, "b [f]", rms=rms, return_stats=True, backend=backend, **given, **grouping)
    mean, rstd = result[-2:]
    assert (mean is None) == rms
    for name, statistic in (("mean", mean), ("rstd", rstd)):
        if statistic is None:
            continue
        assert statistic is not given[name] and not np.shares_memory(statistic, given[name])
        assert statistic.dtype == np.float64 and statistic.shape == shape and statistic.flags.writeable
        np.testing.assert_array_equal(statistic, np.broadcast_to(before[name], shape))
        statistic += 1.0  # the caller's to change: the argument stays as it was
        np.testing.assert_array_equal(given[name], before[name])
