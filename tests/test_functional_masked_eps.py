"""Masked ``normlab.functional`` with any eps torch takes (negative, infinite, NaN): the
statistics still come from the counted elements, and the counts still reach the running
statistics. Oracle: masked normalization written in torch operations, in float64."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normlab.functional as F  # noqa: E402

ODD_EPS = [-1e-3, math.inf, math.nan]


def _masked_composite(x, mask, dims, eps, weight=None, bias=None):
    """torch: mean and biased variance of the counted elements, every element normalized."""
    x, m = torch.from_numpy(x), torch.from_numpy(np.broadcast_to(mask, x.shape).copy()).double()
    n = m.sum(dims, keepdim=True)
    mean = (m * x).sum(dims, keepdim=True) / n
    var = (m * (x - mean) ** 2).sum(dims, keepdim=True) / n
    y = (x - mean) * (var + eps).rsqrt()
    if weight is not None:
        y = y * torch.from_numpy(weight)
    if bias is not None:
        y = y + torch.from_numpy(bias)
    return y.numpy(), mean, var, n


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 3 + 2
    mask = rng.random(shape) < 0.6
    mask[..., :2] = True  # at least two counted values per group: no 0/0 in the oracle
    return x, mask


@pytest.mark.parametrize("eps", ODD_EPS)
def test_masked_layer_norm_with_an_eps_outside_zero_to_infinity_uses_the_counted_statistics(eps):
    x, mask = _data((3, 4, 6))
    weight, bias = np.linspace(0.5, 2, 6), np.linspace(-1, 1, 6)
    expected = _masked_composite(x, mask, [-1], eps, weight, bias)[0]
    got = F.layer_norm(x, (6,), weight, bias, eps=eps, mask=mask)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", ODD_EPS)
def test_masked_group_norm_with_an_eps_outside_zero_to_infinity_uses_the_counted_statistics(eps):
    x, mask = _data((2, 4, 5))
    expected = _masked_composite(x.reshape(2, 2, 10), mask.reshape(2, 2, 10), [-1], eps)[0].reshape(x.shape)
    np.testing.assert_allclose(F.group_norm(x, 2, eps=eps, mask=mask), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", ODD_EPS)
def test_masked_instance_norm_with_an_eps_outside_zero_to_infinity_moves_running_statistics_by_the_counts(eps):
    x, mask = _data((3, 2, 7))
    expected, mean, var, n = _masked_composite(x, mask, [-1], eps)
    running_mean, running_var = np.zeros(2), np.ones(2)
    got = F.instance_norm(x, running_mean, running_var, momentum=0.25, eps=eps, mask=mask)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    unbiased = (var * n / (n - 1)).squeeze(-1)
    np.testing.assert_allclose(running_mean, (0.25 * mean.squeeze(-1)).mean(0).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(running_var, (0.75 + 0.25 * unbiased).mean(0).numpy(), rtol=1e-12, atol=1e-12)


def test_masked_layer_norm_with_a_negative_eps_gives_exactly_bias_where_nothing_is_counted():
    x, mask = _data((2, 3, 4))
    mask[0, 1] = False
    bias = np.array([0.5, -1.0, 2.0, 3.0])
    y = F.layer_norm(x, (4,), np.ones(4), bias, eps=-1e-3, mask=mask)
    assert np.array_equal(y[0, 1], bias)
