"""The fused backward in float32 arithmetic (``fused.direct_row_backward32``: no residual,
no gate, the forward's statistics given), against torch autograd in float64 on the
composite, on the float32 values: parameter sums across samples with their own
modulation rows, rows far from zero, and the inputs where float32 arithmetic would
overflow, which go to the float64 kernel."""

import numpy as np
import pytest

import normlab

torch = pytest.importorskip("torch")


def _autograd(x, grad_y, *, eps, rms, weight=None, bias=None, scale=None, shift=None):
    """Gradients of ``norm(x)·w·(1 + scale[b]) + shift[b] + b`` (float64)."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in dict(x=x, weight=weight, bias=bias, scale=scale, shift=shift).items() if v is not None}
    v = leaves["x"]
    if rms:
        h = v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
    else:
        h = (v - v.mean(-1, keepdim=True)) * torch.rsqrt(v.var(-1, correction=0, keepdim=True) + eps)
    if "weight" in leaves:
        h = h * leaves["weight"]
    if "scale" in leaves:
        h = h * (1 + leaves["scale"][:, None]) + leaves["shift"][:, None]
    if "bias" in leaves:
        h = h + leaves["bias"]
    grads = torch.autograd.grad(h, list(leaves.values()), torch.tensor(grad_y, dtype=torch.float64))
    return {k: g.numpy() for k, g in zip(leaves, grads)}


def _ours(x, grad_y, *, eps, rms, **params):
    """normlab's gradients through the fused kernels (a modulation makes the call a fused
    one; zeros where the test has none)."""
    if "scale" not in params:
        zeros = np.zeros((x.shape[0], x.shape[2]), x.dtype)
        params = dict(params, scale=zeros, shift=zeros)
    kwargs = dict(eps=eps, rms=rms, backend="numba", **params)
    if "weight" in params or "bias" in params:
        kwargs["params"] = "d"
    if "scale" in params:
        kwargs["modulation"] = "b d"
    _, mean, rstd = normlab.normalize(x, "b t [d]", return_stats=True, **kwargs)
    stats = dict(rstd=rstd) if rms else dict(mean=mean, rstd=rstd)
    return normlab.normalize_backward(grad_y, x, "b t [d]", **stats, **kwargs)


def _close(got, want, rtol):
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= rtol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


def test_weight_and_per_sample_modulation_sum_over_samples_whose_rows_share_no_flush_window():
    """50 tokens a sample: float32 parameter sums that a sample boundary splits."""
    rng = np.random.default_rng(0)
    b, t, d = 3, 50, 96
    x = rng.normal(size=(b, t, d)).astype(np.float32) * 3 + 1
    params = dict(weight=rng.normal(size=d).astype(np.float32), bias=rng.normal(size=d).astype(np.float32),
                  scale=rng.normal(size=(b, d)).astype(np.float32), shift=rng.normal(size=(b, d)).astype(np.float32))
    grad_y = rng.normal(size=(b, t, d)).astype(np.float32)
    got = _ours(x, grad_y, eps=1e-6, rms=False, **params)
    want = _autograd(x, grad_y, eps=1e-6, rms=False, **params)
    for name in ("x", "weight", "bias", "scale", "shift"):
        _close(getattr(got, name), want[name], 1e-5)


def test_rows_a_million_standard_deviations_from_zero_keep_float64_gradients_to_1e4():
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(size=(2, 64, 256)) * 1e-2).astype(np.float32)
    weight = rng.normal(size=256).astype(np.float32)
    grad_y = rng.normal(size=x.shape).astype(np.float32)
    got = _ours(x, grad_y, eps=1e-12, rms=False, weight=weight)
    want = _autograd(x, grad_y, eps=1e-12, rms=False, weight=weight)
    _close(got.x, want["x"], 1e-4)
    _close(got.weight, want["weight"], 1e-4)


def test_gradients_near_the_float32_maximum_are_those_of_float64_arithmetic():
    """Row sums of 5e36-sized terms overflow float32; those calls run in float64."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 1024)).astype(np.float32)
    grad_y = (np.sign(x) * 5e36).astype(np.float32)  # Σ g·x̂ over a block of 1024: about 4e39
    got = _ours(x, grad_y, eps=1e-6, rms=True)
    want = _autograd(x, grad_y, eps=1e-6, rms=True)
    _close(got.x, want["x"], 1e-5)


def test_an_rstd_beyond_float32s_range_is_applied_in_float64():
    """eps=0 and rows of subnormal values: rstd ≈ 1e41 is inf in float32, and 0·inf a NaN
    (gradients as small, so that the result is a float32 number)."""
    rng = np.random.default_rng(3)
    x = np.zeros((2, 64, 128), np.float32)
    x[..., ::3] = np.float32(1e-41) * rng.choice([-1, 1], size=x[..., ::3].shape)
    grad_y = (rng.normal(size=x.shape) * 1e-40).astype(np.float32)
    got = _ours(x, grad_y, eps=0.0, rms=True)
    want = _autograd(x.astype(np.float64), grad_y, eps=0.0, rms=True)
    assert np.isfinite(want["x"]).all()
    _close(got.x, want["x"], 1e-5)


def test_the_float32_backward_gives_the_same_bits_on_one_thread_and_two(every_call_threaded):
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(4)
    b, t, d = 4, 370, 80  # 16 chunks of 93 rows, which end inside samples and inside flush windows
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    params = dict(weight=rng.normal(size=d).astype(np.float32), bias=rng.normal(size=d).astype(np.float32),
                  scale=rng.normal(size=(b, d)).astype(np.float32), shift=rng.normal(size=(b, d)).astype(np.float32))
    grad_y = rng.normal(size=x.shape).astype(np.float32)
    before = numba.get_num_threads()
    try:
        results = []
        for count in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(count)
            g = _ours(x, grad_y, eps=1e-6, rms=False, **params)
            results.append([g.x, g.weight, g.bias, g.scale, g.shift])
    finally:
        numba.set_num_threads(before)
    for one, two in zip(*results):
        assert one.tobytes() == two.tobytes()


def _gated_autograd(x, z, grad_y, *, groups, eps, weight, bias, norm_before_gate=True):
    """``(rms_norm per group · w + b) · silu(z)`` (mamba_ssm's ``RMSNormGated``, gate after
    the norm; before it: ``rms_norm(x·silu(z)) · w + b``), float64."""
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, z, weight, bias)]
    v, gate, w, b = leaves
    if not norm_before_gate:
        v = v * torch.nn.functional.silu(gate)
    grouped = v.reshape(*v.shape[:-1], groups, -1)
    h = (grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)).reshape(v.shape)
    y = (h * w + b) * torch.nn.functional.silu(gate) if norm_before_gate else h * w + b
    return [g.numpy() for g in torch.autograd.grad(y, leaves, torch.tensor(grad_y, dtype=torch.float64))]


def _gated_ours(x, z, grad_y, *, groups, eps, weight, bias, norm_before_gate=True):
    kwargs = dict(eps=eps, rms=True, backend="numba", gate=z, weight=weight.reshape(groups, -1),
                  bias=bias.reshape(groups, -1), params="g c", g=groups, norm_before_gate=norm_before_gate)
    _, _, rstd = normlab.normalize(x, "b t (g [c])", return_stats=True, **kwargs)
    got = normlab.normalize_backward(grad_y, x, "b t (g [c])", rstd=rstd, **kwargs)
    return [got.x, got.gate, got.weight.reshape(-1), got.bias.reshape(-1)]


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_with_weights_per_group_against_torch_autograd(norm_before_gate):
    """Consecutive rows take other weight rows: each gathers its own float32 sums."""
    rng = np.random.default_rng(5)
    b, t, groups, c = 2, 45, 4, 64
    x, z, grad_y = (rng.normal(size=(b, t, groups * c)).astype(np.float32) for _ in range(3))
    weight, bias = (rng.normal(size=groups * c).astype(np.float32) for _ in range(2))
    got = _gated_ours(x, z, grad_y, groups=groups, eps=1e-5, weight=weight, bias=bias,
                      norm_before_gate=norm_before_gate)
    want = _gated_autograd(x, z, grad_y, groups=groups, eps=1e-5, weight=weight, bias=bias,
                           norm_before_gate=norm_before_gate)
    for g, w in zip(got, want):
        _close(g, w, 1e-5)


def test_gated_gradients_near_the_float32_maximum_are_those_of_float64_arithmetic():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 8, 2 * 512)).astype(np.float32)
    z = np.ones_like(x)
    grad_y = (np.sign(x) * 2e36).astype(np.float32)  # Σ γ·x̂ over a group of 512: about 6e38
    ones, zeros = np.ones(1024, np.float32), np.zeros(1024, np.float32)
    got = _gated_ours(x, z, grad_y, groups=2, eps=1e-5, weight=ones, bias=zeros)
    want = _gated_autograd(x, z, grad_y, groups=2, eps=1e-5, weight=ones, bias=zeros)
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)


def test_weights_near_the_float32_maximum_are_applied_in_float64():
    """A weight of 5e35: Σ γ·x̂ over a block of 1024 reaches about 4e38 in float32."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 8, 1024)).astype(np.float32)
    weight = np.full(1024, 5e35, np.float32)
    grad_y = np.sign(x).astype(np.float32)
    got = _ours(x, grad_y, eps=1e-6, rms=True, weight=weight)
    want = _autograd(x, grad_y, eps=1e-6, rms=True, weight=weight)
    _close(got.x, want["x"], 1e-5)


def test_a_gate_before_a_layer_norm_far_from_zero_keeps_float64_gradients_to_1e4():
    """h = x·silu(z) ≈ 1e5 with std 0.1: rounded to float32 it would move x̂ by 4%."""
    rng = np.random.default_rng(8)
    x = (1e4 + rng.normal(size=(2, 64, 256)) * 1e-2).astype(np.float32)
    z = np.full(x.shape, 10.0, np.float32)
    grad_y = rng.normal(size=x.shape).astype(np.float32)
    kwargs = dict(eps=1e-12, rms=False, backend="numba", gate=z, norm_before_gate=False)
    _, mean, rstd = normlab.normalize(x, "b t [d]", return_stats=True, **kwargs)
    got = normlab.normalize_backward(grad_y, x, "b t [d]", mean=mean, rstd=rstd, **kwargs)
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, z)]
    h = leaves[0] * torch.nn.functional.silu(leaves[1])
    y = torch.nn.functional.layer_norm(h, (256,), eps=1e-12)
    want = torch.autograd.grad(y, leaves, torch.tensor(grad_y, dtype=torch.float64))
    _close(got.x, want[0].numpy(), 1e-4)
    _close(got.gate, want[1].numpy(), 1e-4)


def test_a_gate_that_multiplies_the_gradient_past_float32s_range_is_applied_in_float64():
    """silu(1e20) = 1e20 times gradients of 1e20: the gradient entering the norm is 1e40,
    past float32's maximum, while its gradients, times rstd ≈ 1e-10, are about 1e30."""
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(1, 4, 64)) * 1e10).astype(np.float32)
    z = np.full(x.shape, 1e20, np.float32)
    grad_y = (rng.normal(size=x.shape) * 1e20).astype(np.float32)
    ones, zeros = np.ones(64, np.float32), np.zeros(64, np.float32)
    got = _gated_ours(x, z, grad_y, groups=1, eps=1e-6, weight=ones, bias=zeros)
    want = _gated_autograd(x, z, grad_y, groups=1, eps=1e-6, weight=ones, bias=zeros)
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)


def test_a_gate_before_the_norm_on_values_near_the_float32_maximum_keeps_finite_gate_gradients():
    """x ≈ 1e38 and silu(-80) ≈ -1e-33: the gate gradient's product grad_h·x overflows
    float32 before silu'(-80) ≈ -1e-33 brings it back to about 1e6."""
    rng = np.random.default_rng(10)
    x = (rng.uniform(0.5, 1.0, size=(1, 4, 64)) * 1e38).astype(np.float32)
    z = np.full(x.shape, -80.0, np.float32)
    grad_y = (rng.normal(size=x.shape) * 1e6).astype(np.float32)
    ones, zeros = np.ones(64, np.float32), np.zeros(64, np.float32)
    got = _gated_ours(x, z, grad_y, groups=1, eps=1e-6, weight=ones, bias=zeros, norm_before_gate=False)
    want = _gated_autograd(x, z, grad_y, groups=1, eps=1e-6, weight=ones, bias=zeros, norm_before_gate=False)
    _close(got[0], want[0], 1e-5)
    _close(got[1], want[1], 1e-5)
