"""Inputs of the NumPy API that users hand it and that it once mishandled: a mean given
with ``rms=True``, segment ids far beyond the input's size, and more.

Oracles: float64 definitions written here (per-segment instance norm), the contract that
bad input raises a ``normlab.errors`` error repeating the pattern and the shape and saying
how to fix it, and hypothesis properties.
"""

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
