"""NumPy ``functional.batch_norm(..., mask=)`` in training where a channel has nothing
counted: as torch.nn on the batch with the padding removed (an empty batch: accepted, the
running statistics kept) and as normlab.torch's twins with ``mask=`` (that channel gives
exactly ``bias``)."""

import numpy as np
import pytest

import normlab.functional
from normlab.errors import InputError

torch = pytest.importorskip("torch")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3, 5))
    weight, bias = rng.standard_normal(3), rng.standard_normal(3)
    return x, weight, bias


def test_batch_norm_with_nothing_counted_keeps_running_stats_as_torch_nn_on_the_empty_batch_does():
    x, weight, bias = _data()
    mask = np.zeros(x.shape, bool)
    running_mean, running_var = np.full(3, 0.25), np.full(3, 2.0)
    y = normlab.functional.batch_norm(x, running_mean, running_var, weight, bias, training=True, mask=mask)
    oracle = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        oracle.running_mean.fill_(0.25), oracle.running_var.fill_(2.0)
    empty = oracle(torch.from_numpy(x)[:, :, :0])  # the batch with the padding removed
    assert empty.shape == (4, 3, 0)
    np.testing.assert_array_equal(running_mean, oracle.running_mean.numpy())
    np.testing.assert_array_equal(running_var, oracle.running_var.numpy())
    twin = _twin(weight, bias, 0.25, 2.0)
    want = twin(torch.from_numpy(x), mask=torch.from_numpy(mask)).detach().numpy()
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None], x.shape))  # x̂ = 0: exactly bias


def _twin(weight, bias, mean, var):
    import normlab.torch

    twin = normlab.torch.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.copy_(torch.from_numpy(weight)), twin.bias.copy_(torch.from_numpy(bias))
        twin.running_mean.fill_(mean), twin.running_var.fill_(var)
    return twin


def test_batch_norm_with_one_channel_uncounted_trains_the_others_as_torch_nn_on_their_counted_values():
    x, weight, bias = _data(1)
    mask = np.ones(x.shape, bool)
    mask[:, 1] = False  # channel 1 is all padding
    mask[:, 2, 3:] = False  # channel 2 partly
    running_mean, running_var = np.zeros(3), np.ones(3)
    y = normlab.functional.batch_norm(x, running_mean, running_var, weight, bias, training=True, mask=mask)
    for channel, length in ((0, 5), (2, 3)):
        oracle = torch.nn.BatchNorm1d(1, dtype=torch.float64)
        with torch.no_grad():
            oracle.weight.fill_(weight[channel]), oracle.bias.fill_(bias[channel])
        want = oracle(torch.from_numpy(x[:, channel:channel + 1, :length].copy()))
        np.testing.assert_allclose(y[:, channel, :length], want[:, 0].detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(running_mean[channel], oracle.running_mean.item(), rtol=1e-12)
        np.testing.assert_allclose(running_var[channel], oracle.running_var.item(), rtol=1e-12)
    assert running_mean[1] == 0.0 and running_var[1] == 1.0
    twin = _twin(weight, bias, 0.0, 1.0)
    want = twin(torch.from_numpy(x), mask=torch.from_numpy(mask)).detach().numpy()
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(running_mean, twin.running_mean.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(running_var, twin.running_var.numpy(), rtol=1e-12)


def test_batch_norm_with_one_counted_value_in_a_channel_is_refused_as_torch_nn_refuses_it():
    x, weight, bias = _data(2)
    mask = np.ones(x.shape, bool)
    mask[:, 1] = False
    mask[0, 1, 0] = True  # one value counted in channel 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # the oracle
        torch.nn.BatchNorm1d(1, dtype=torch.float64)(torch.from_numpy(x[:1, 1:2, :1].copy()))
    running_mean, running_var = np.zeros(3), np.ones(3)
    with pytest.raises(InputError, match=r"more than 1 counted value per channel.*got 1.*\(4, 3, 5\)"):
        normlab.functional.batch_norm(x, running_mean, running_var, training=True, mask=mask)
    assert running_mean.tolist() == [0.0] * 3 and running_var.tolist() == [1.0] * 3
