"""The fast path of repeated ``normalize`` calls: a call with the same pattern, shape,
dtypes and flags as an earlier one skips the checks and the plan, and gives what torch
gives; anything the cached decisions do not cover still gets the full checks and their
clear errors. Oracle: torch's own functions."""

import numpy as np
import pytest

import normlab
from normlab import core
from normlab.errors import InputError, ParamsError

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
