"""The float32 gate of the fused kernels on float32 and bfloat16 rows (vector_exp32 and
the silu/sigmoid built on it), against torch's float64 functions and autograd."""

import numba
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from normlab.kernels.gates import logistic_gate32, logistic_gate_derivative32, vector_exp32  # noqa: E402


@numba.njit
def _exp(values, out):
    for i in range(values.shape[0]):
        out[i] = vector_exp32(values[i])


@numba.njit
def _gate(values, code, out, slope):
    for i in range(values.shape[0]):
        out[i] = logistic_gate32(values[i], code)
        slope[i] = logistic_gate_derivative32(values[i], code)[1]


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)


def test_exp32_is_within_two_float32_ulps_of_exp_over_its_whole_range():
    values = np.concatenate([np.linspace(-87, 88, 2_000_001, dtype=np.float32),
                             np.float32([0, -0.0, 1e-30, -1e-30, 0.34657359, -0.34657359])])
    got = np.empty_like(values)
    _exp(values, got)
    exact = torch.exp(torch.from_numpy(values).double()).numpy()
    assert _ulps(got, exact).max() <= 2


def test_exp32_edges_are_those_of_the_float64_exp():
    values = np.float32([np.inf, 89.0, 1000.0, -np.inf, -1000.0, np.nan])
    got = np.empty_like(values)
    _exp(values, got)
    assert np.isposinf(got[:3]).all()
    assert (got[3:5] >= 0).all() and (got[3:5] < 1e-37).all()  # (clamped at -87, as vector_exp at -708)
    assert np.isnan(got[5])


@pytest.mark.parametrize("code, function", [(0, torch.nn.functional.silu), (1, torch.sigmoid)])
def test_gate32_and_its_slope_are_torchs_float64_ones_to_float32_precision(code, function):
    values = np.concatenate([np.linspace(-30, 30, 600_001, dtype=np.float32), np.float32([0.0, -0.0])])
    got, slope = np.empty(values.shape), np.empty(values.shape)
    _gate(values, code, got, slope)
    z = torch.from_numpy(values).double().requires_grad_()
    exact = function(z)
    (exact_slope,) = torch.autograd.grad(exact.sum(), z)
    scale = np.maximum(np.abs(exact.detach().numpy()), 1e-30)
    assert (np.abs(got - exact.detach().numpy()) <= 4e-7 * scale + 1e-37).all()
    assert np.abs(slope - exact_slope.numpy()).max() <= 1e-6


@pytest.mark.parametrize("code", [0, 1])
def test_gate32_passes_nan_on_and_takes_infinities_as_torch_does(code):
    values = np.float32([np.nan, np.inf, -np.inf])
    got, slope = np.empty(3), np.empty(3)
    _gate(values, code, got, slope)
    function = torch.nn.functional.silu if code == 0 else torch.sigmoid
    want = function(torch.from_numpy(values).double()).numpy()
    np.testing.assert_array_equal(got, want)  # silu(-inf) is -inf·0: NaN, as torch gives it
