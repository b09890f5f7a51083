"""Corners of the NumPy API found by trying it as NumPy users and people porting models do:
given statistics with masks and segments, byte orders, and more.

Oracles: float64 definitions written here (the per-segment instance norm and layer norm),
NumPy's own behaviour for what it accepts (``np.mean`` takes big-endian floats), and the
contract that a shape which only fits by count is refused, never reshaped.
"""

import numpy as np
import pytest

import normlab
from normlab.errors import ShapeError

BACKENDS = ["numba", "numpy"]


def _per_segment(x, ids, eps=1e-5):
    """Instance norm of each segment of rows of ``x`` (float64): mean, rstd and y."""
    x = np.asarray(x, np.float64)
    n = ids.max() + 1
    mean = np.stack([x[ids == s].mean(axis=0) for s in range(n)])
    var = np.stack([((x[ids == s] - mean[s]) ** 2).mean(axis=0) for s in range(n)])
    rstd = 1.0 / np.sqrt(var + eps)
    return mean, rstd, (x - mean[ids]) * rstd[ids]


# --- given statistics with segments and masks -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_statistics_given_transposed_are_refused_not_reordered(backend):
    x = np.random.default_rng(0).standard_normal((5, 3))
    ids = np.array([1, 0, 1, 0, 1])
    mean, rstd, _ = _per_segment(x, ids)  # (2 segments, 3 channels)
    with pytest.raises(ShapeError, match=r"\(3, 2\).*\(2, 3\)"):
        normlab.normalize(x, "[n] c", segment_ids=ids, mean=mean.T, rstd=rstd.T, backend=backend)
    with pytest.raises(ShapeError, match="'\\[n\\] c'"):
        normlab.normalize_backward(np.ones_like(x), x, "[n] c", segment_ids=ids, mean=mean.T, rstd=rstd.T,
                                   backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_statistics_given_in_their_shape_apply_as_the_definition(backend):
    x = np.random.default_rng(1).standard_normal((5, 3))
    ids = np.array([1, 0, 1, 0, 1])
    mean, rstd, expected = _per_segment(x, ids)
    y = normlab.normalize(x, "[n] c", segment_ids=ids, mean=mean, rstd=rstd, backend=backend)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_statistics_broadcast_as_unmasked_ones_do(backend):
    """A scalar mean and rstd broadcast to every group, with a mask as without one."""
    x = np.random.default_rng(2).standard_normal((4, 3))
    mask = np.array([True, False, True])
    y = normlab.normalize(x, "b [f]", mask=mask, mean=0.5, rstd=2.0, backend=backend)
    np.testing.assert_allclose(y, (x - 0.5) * 2.0, rtol=0, atol=1e-12)
    y = normlab.normalize(x, "b [f]", mask=mask, mean=np.full(4, 0.5), rstd=np.full(4, 2.0), backend=backend)
    np.testing.assert_allclose(y, (x - 0.5) * 2.0, rtol=0, atol=1e-12)
