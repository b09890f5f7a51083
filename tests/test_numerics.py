"""The numerical promises: the note's claims to the bit, cancellation-free variance, NaN
isolation, untouched inputs, out=, dtypes, and hypothesis properties of a normalization."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import normlab

FLOATS = [np.float16, np.float32, np.float64]
NOTE_2D = [[4, 3, 2], [3, 3, 2], [2, 2, 2]]
NOTE_3D = [[[1.0, 4.0, 7.0], [0.0, 2.0, 4.0]], [[1.0, 3.0, 6.0], [2.0, 3.0, 1.0]]]


# ---- the note's claims, bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_note_2d_batch_norm_claims_hold_exactly(dtype):
    y = normlab.normalize(np.array(NOTE_2D, dtype), "[b] f")
    assert y[1, 0] == 0  # feature 0 is [4, 3, 2]: its middle is the mean
    assert y[0, 0] == -y[2, 0] and y[0, 0] > 0  # and the ends mirror each other: [x1, 0, -x1]
    assert y[0, 1] == y[1, 1]  # feature 1 is [3, 3, 2]: the two 3s give the same a
    assert np.all(y[:, 2] == 0)  # feature 2 is [2, 2, 2]: all equal, all 0


@pytest.mark.parametrize("dtype", FLOATS)
def test_note_2d_layer_norm_normalizes_each_row(dtype):
    y = normlab.normalize(np.array(NOTE_2D, dtype), "b [f]")
    assert y[0, 1] == 0 and y[1, 0] == y[1, 1] and np.all(y[2] == 0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_note_3d_batch_norm_gives_equal_outputs_for_equal_inputs(dtype):
    x = np.array(NOTE_3D, dtype)
    y = normlab.normalize(x, "[b] f [s]")
    assert y[0, 0, 0] == y[1, 0, 0]  # the two 1s of feature 0: a1
    assert y[0, 1, 1] == y[1, 1, 0]  # the two 2s of feature 1: b1
    assert y[0, 1, 1] == 0  # and 2 is feature 1's mean


def test_constant_group_normalizes_to_exact_zero_and_affine_gives_exactly_the_bias():
    x = np.full((3, 4, 5), 7.3, np.float32)
    x[1] = np.float32(-1e6 / 3)
    bias = np.array([0.1, -2.0, 3.0, 1e-7], np.float32)
    y = normlab.normalize(x, "b c [s]", weight=np.full(4, 5.0, np.float32), bias=bias, params="c")
    assert np.array_equal(y, np.broadcast_to(bias[:, None], y.shape))
    assert np.all(normlab.normalize(x, "b [c s]") == 0)


@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e3), st.sampled_from([np.float16, np.float32]))
def test_the_middle_of_a_symmetric_low_precision_triple_is_exactly_zero(center, step, dtype):
    with np.errstate(over="ignore"):
        x = np.array([center - step, center, center + step], dtype)
    assume(np.isfinite(x).all())  # float16 overflows past 65504
    exact = x.astype(np.float64)  # differences of two float32 values are exact in float64
    assume(exact[1] - exact[0] == exact[2] - exact[1])  # rounding to dtype may break the symmetry
    assert normlab.normalize(x[None], "b [f]")[0, 1] == 0


@given(hnp.arrays(np.float32, st.tuples(st.integers(2, 6), st.integers(2, 6)),
                  elements=st.sampled_from([-3.0, 0.5, 2.0, 1e4])))
def test_equal_inputs_in_one_group_give_identical_outputs(x):
    y = normlab.normalize(x, "[b] f")
    for feature in range(x.shape[1]):
        for value in np.unique(x[:, feature]):
            assert len(np.unique(y[x[:, feature] == value, feature])) == 1


# ---- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset_over_std", [1e3, 1e5, 1e6])
@pytest.mark.parametrize("std", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("pattern", ["b [d]", "[b] d"])
def test_float32_with_large_mean_over_std_stays_within_1e_4_of_float64(offset_over_std, std, pattern):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = (offset_over_std * std + std * rng.standard_normal((64, 256))).astype(np.float32)
    x64 = torch.tensor(x, dtype=torch.float64)  # the same float32 values, computed in float64 by torch
    dims = (1,) if pattern == "b [d]" else (0,)
    var, mean = torch.var_mean(x64, dim=dims, correction=0, keepdim=True)
    expected = ((x64 - mean) / torch.sqrt(var + 1e-5 * 0)).numpy()
    y = normlab.normalize(x, pattern, eps=0.0)
    assert np.abs(y - expected).max() < 1e-4


def test_naive_float32_variance_would_fail_the_large_offset_case():
    """Guards the test above: the data really does defeat E[x²]−E[x]² in float32."""
    x = (1e6 + np.random.default_rng(0).standard_normal(4096)).astype(np.float32)
    naive = np.mean(np.square(x)) - np.square(np.mean(x))
    assert abs(naive - x.astype(np.float64).var()) > 0.5


# ---- isolation, immutability, out= ----------------------------------------------------------


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("pattern, group", [("b [d]", (slice(1, 2), slice(None))), ("[b] d", (slice(None), slice(2, 3)))])
def test_nan_or_inf_poisons_only_its_own_group(poison, pattern, group):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5))
    clean = normlab.normalize(x, pattern)
    x[1, 2] = poison
    y = normlab.normalize(x, pattern)
    inside = np.zeros(x.shape, bool)
    inside[group] = True
    assert np.all(np.isnan(y[inside]))
    np.testing.assert_array_equal(y[~inside], clean[~inside])


def test_inputs_are_never_modified():
    rng = np.random.default_rng(2)
    x, w, b, g = rng.standard_normal((3, 4, 5)), rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal((3, 4, 5))
    copies = [a.copy() for a in (x, w, b, g)]
    for array in (x, w, b, g):
        array.flags.writeable = False  # a write would raise
    _, mean, rstd = normlab.normalize(x, "[b] c [s]", weight=w, bias=b, params="c", return_stats=True)
    normlab.normalize_backward(g, x, "[b] c [s]", weight=w, params="c", mean=mean, rstd=rstd)
    normlab.functional.layer_norm(x, 5)
    for array, copy in zip((x, w, b, g), copies):
        np.testing.assert_array_equal(array, copy)


@pytest.mark.parametrize("contiguous", [True, False])
def test_out_receives_the_result_and_is_returned(contiguous):
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    out = np.empty((6, 4), np.float32).T if not contiguous else np.empty((4, 6), np.float32)
    result = normlab.normalize(x, "b [d]", out=out)
    assert result is out
    np.testing.assert_array_equal(out, normlab.normalize(x, "b [d]"))


def test_out_may_be_the_input_itself():
    x = np.random.default_rng(4).standard_normal((4, 6))
    expected = normlab.normalize(x, "b [d]")
    normlab.normalize(x, "b [d]", out=x)
    np.testing.assert_array_equal(x, expected)


def test_non_contiguous_input_gives_the_same_result_as_its_copy():
    x = np.random.default_rng(5).standard_normal((6, 8, 4))[:, ::2].transpose(2, 0, 1)
    np.testing.assert_array_equal(normlab.normalize(x, "[b] c [s]"), normlab.normalize(x.copy(), "[b] c [s]"))


# ---- dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_output_dtype_is_the_input_dtype(dtype):
    x = np.random.default_rng(6).standard_normal((3, 8)).astype(dtype)
    assert normlab.normalize(x, "b [d]").dtype == dtype
    assert normlab.normalize_backward(x, x, "b [d]")[0].dtype == dtype


def test_float16_is_the_float64_result_rounded_once():
    x = np.random.default_rng(7).standard_normal((5, 64)).astype(np.float16)
    torch = pytest.importorskip("torch")
    expected = torch.nn.functional.layer_norm(torch.tensor(x, dtype=torch.float64), (64,)).numpy().astype(np.float16)
    np.testing.assert_array_equal(normlab.normalize(x, "b [d]"), expected)


def test_integer_input_is_promoted_to_float64():
    y = normlab.normalize(np.array(NOTE_2D), "[b] f")
    assert y.dtype == np.float64 and y[1, 0] == 0


def test_empty_input_gives_empty_output():
    assert normlab.normalize(np.zeros((0, 4), np.float32), "b [d]").shape == (0, 4)


# ---- properties of any normalization --------------------------------------------------------

shapes = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 5))
patterns = st.sampled_from(["b c [s]", "b [c s]", "[b] c [s]", "[b c] s", "b [c] s"])
values = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@given(hnp.arrays(np.float64, shapes, elements=values), patterns)
def test_every_group_has_mean_zero_and_variance_one(x, pattern):
    plan = normlab.make_plan(pattern, x.shape)
    y = normlab.normalize(x, pattern, eps=0.0)
    y_eps = normlab.normalize(x, pattern)
    ids = plan.group_ids()
    for group in np.unique(ids):
        members = y[ids == group]
        spread = np.ptp(x[ids == group])
        if spread == 0:  # with eps=0 that is 0/0 = NaN, as in torch; with eps > 0 exactly 0
            assert np.all(y_eps[ids == group] == 0)
        elif spread > 1e-6 * max(1.0, np.abs(x[ids == group]).max()):
            assert abs(members.mean()) < 1e-9
            assert abs(members.var() - 1) < 1e-9


@given(hnp.arrays(np.float64, shapes, elements=values), patterns, st.floats(-1e3, 1e3), st.floats(1e-2, 1e2))
def test_shifting_and_scaling_a_group_leaves_its_output_unchanged(x, pattern, shift, scale):
    plan = normlab.make_plan(pattern, x.shape)
    ids = plan.group_ids()
    offsets = (ids * 0.37 + shift).astype(np.float64)  # a different shift for every group
    y = normlab.normalize(x, pattern, eps=0.0)
    shifted = x * scale + offsets
    moved = normlab.normalize(shifted, pattern, eps=0.0)
    degenerate = np.zeros(x.shape, bool)
    for group in np.unique(ids):
        members, moved_members = x[ids == group], shifted[ids == group]
        # a spread near the offset's rounding is not kept by the shift itself (float64 rounds
        # x·scale + offset to 1e-16 of the offset), so no normalization could recover it
        degenerate[ids == group] = (np.ptp(members) < 1e-6 * max(1.0, np.abs(members).max())
                                    or np.ptp(moved_members) < 1e-6 * max(1.0, np.abs(moved_members).max()))
    np.testing.assert_allclose(moved[~degenerate], y[~degenerate], atol=1e-6)
