"""Large float32 row norms write their output with non-temporal stores (one 64-byte line
at a time, the row's unaligned head and short tail as usual). These inputs are past that
size (``rows.STREAM_ELEMENTS``), so every test here runs the streamed stores. Oracles:
torch's ``F.layer_norm``, ``F.rms_norm`` and ``F.group_norm`` in float64, the float64
definition, and the contract's exact properties; none of it calls normlab's own math."""

import numpy as np
import pytest

import normlab

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
F = torch.nn.functional

from normlab.kernels import rows as row_kernels  # noqa: E402

ELEMENTS = row_kernels.STREAM_ELEMENTS


def torch64(function, x, *args, **kwargs) -> np.ndarray:
    """``function`` on float64 copies of NumPy arrays (None stays None)."""
    def t(a):
        return None if a is None else torch.from_numpy(np.asarray(a, np.float64))
    return function(t(x), *args[:1], *[t(a) for a in args[1:]], **kwargs).numpy()


@pytest.mark.parametrize("n", [4096, 4099, 1000, 16, 17, 2**22 + 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rms", [False, True])
def test_streamed_rows_match_torch_in_float64(n, affine, rms):
    rows = -(-ELEMENTS // n)
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((rows, n)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32) if affine else None
    b = rng.standard_normal(n).astype(np.float32) if affine else None
    params = {"weight": w, "bias": None if rms else b, "params": "d"} if affine else {}
    y = normlab.normalize(x, "b [d]", eps=1e-5, rms=rms, **params)
    if rms:
        expected = torch64(F.rms_norm, x, (n,), w, eps=1e-5)
    else:
        expected = torch64(F.layer_norm, x, (n,), w, b, eps=1e-5)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5 * (1 if w is None else np.abs(w).max()) + 1e-6)


@pytest.mark.parametrize("offset", [0, 1, 3, 8, 15, 16, 17])
def test_streamed_rows_into_outputs_at_every_offset_within_a_line(offset):
    """``out=`` views that start anywhere in a 64-byte line, and one not even aligned to
    a float32 (a byte offset of 1), give torch's result and touch nothing around them."""
    n = 4096 + 5
    rows = -(-ELEMENTS // n)
    rng = np.random.default_rng(offset)
    x = (rng.standard_normal((rows, n)) + 2).astype(np.float32)
    w, b = rng.standard_normal((2, n)).astype(np.float32)
    expected = torch64(F.layer_norm, x, (n,), w, b, eps=1e-5)
    buffer = np.full(rows * n + 32, -7.0, np.float32)
    out = buffer[offset:offset + rows * n].reshape(rows, n)
    normlab.normalize(x, "b [d]", weight=w, bias=b, params="d", out=out)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-5 * np.abs(w).max())
    assert np.all(buffer[:offset] == -7.0) and np.all(buffer[offset + rows * n:] == -7.0)

    raw = np.zeros(rows * n * 4 + 8, np.uint8)
    unaligned = np.frombuffer(raw.data, np.float32, rows * n, offset=1).reshape(rows, n)
    assert not unaligned.flags.aligned
    normlab.normalize(x, "b [d]", weight=w, bias=b, params="d", out=unaligned)
    np.testing.assert_allclose(unaligned, expected, rtol=0, atol=2e-5 * np.abs(w).max())


def test_streamed_rows_keep_the_numerics_contract():
    """Among ordinary rows of one large input: constant rows give exactly the bias,
    symmetric rows an exact middle, rows at |mean|/std = 1e6 stay within 1e-4 of the
    float64 definition, rows of extreme scale normalize, and a NaN stays in its row."""
    n = 4096 + 7
    rows = -(-ELEMENTS // n)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    weight = np.full(n, 2.5, np.float32)
    x[3] = np.float32(-1.25e7)  # constant
    half = n // 2
    steps = rng.integers(1, 2**20, half)
    symmetric = np.concatenate([[0], steps, -steps]).astype(np.float64) * 2.0**-7 + 1000.0
    order = rng.permutation(n)
    x[5] = symmetric[order].astype(np.float32)
    middle = int(np.flatnonzero(order == 0)[0])
    x[7] = (1e6 + rng.standard_normal(n)).astype(np.float32)  # |mean|/std = 1e6
    x[9] = (1e-30 * rng.standard_normal(n)).astype(np.float32)  # rstd past float32's comfortable range
    x[11, 100] = np.nan
    y = normlab.normalize(x, "b [d]", weight=weight, bias=bias, params="d", eps=0.0)
    assert np.array_equal(normlab.normalize(x, "b [d]", weight=weight, bias=bias, params="d")[3], bias)
    assert y[5, middle] == bias[middle]
    x64 = x.astype(np.float64)
    for r in (7, 9, 12):
        centred = x64[r] - x64[r].mean()
        expected = centred / np.sqrt(np.mean(centred**2)) * 2.5 + bias
        np.testing.assert_allclose(y[r], expected, rtol=0, atol=1e-4 * 2.5)
    assert np.all(np.isnan(y[11]))
    assert not np.isnan(np.delete(y, [3, 11], axis=0)).any()  # (row 3, constant, is NaN at eps=0)


def test_streamed_group_norm_rows_match_torch():
    """Group norm's rows repeat each channel's parameter along the row: stored as usual."""
    batch, channels, spatial = 8, 64, ELEMENTS // (8 * 64) + 3
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((batch, channels, spatial)) + 5).astype(np.float32)
    w, b = rng.standard_normal((2, channels)).astype(np.float32)
    y = normlab.normalize(x, "b (g [c]) [s]", weight=w, bias=b, params="(g c)", g=8, eps=1e-5)
    np.testing.assert_allclose(y, torch64(F.group_norm, x, 8, w, b, eps=1e-5), rtol=0, atol=2e-5 * np.abs(w).max())


def test_streamed_module_outputs_match_torch_nn_forward_and_backward():
    """The torch twins at a streamed size, with and without gradients."""
    from normlab.torch import LayerNorm, RMSNorm

    n = 2048
    x = torch.randn(ELEMENTS // n + 1, n) * 2 + 1
    for twin, reference in ((LayerNorm(n), torch.nn.LayerNorm(n)), (RMSNorm(n), torch.nn.RMSNorm(n))):
        with torch.no_grad():
            twin.weight.normal_()
            reference.weight.copy_(twin.weight)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), reference.double()(x.double()).float(), atol=1e-4, rtol=0)
        reference.float()
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        twin(x1).square().sum().backward()
        reference(x2).square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-3, rtol=1e-3)


def test_streamed_rows_are_bit_identical_on_one_and_two_threads():
    from normlab import kernels

    n = 4096 + 9
    x = (7 + np.random.default_rng(6).standard_normal((ELEMENTS // n + 1, n))).astype(np.float32)
    w = np.random.default_rng(7).standard_normal(n).astype(np.float32)
    results = []
    for count in (1, 2):
        with kernels.threads.at_most(count):
            results.append(normlab.normalize(x, "b [d]", weight=w, bias=w, params="d").tobytes())
    assert results[0] == results[1]


def torch_gradients(x, w, grad_y, rms, eps):
    """torch autograd in float64: (grad_x, grad_weight, grad_bias) of layer or RMS norm."""
    n = x.shape[1]
    xt, wt = (torch.from_numpy(a.astype(np.float64)).requires_grad_() for a in (x, w))
    bt = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    y = F.rms_norm(xt, (n,), wt, eps=eps) if rms else F.layer_norm(xt, (n,), wt, bt, eps=eps)
    y.backward(torch.from_numpy(grad_y.astype(np.float64)))
    return xt.grad.numpy(), wt.grad.numpy(), None if rms else bt.grad.numpy()


@pytest.mark.parametrize("n", [4096, 4099, 1000, 2**22 + 3])
@pytest.mark.parametrize("rms", [False, True])
def test_streamed_row_gradients_match_torch_autograd_in_float64(n, rms):
    rows = -(-ELEMENTS // n)
    rng = np.random.default_rng(n + rms)
    x = (rng.standard_normal((rows, n)) * 2 + 3).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal((rows, n)).astype(np.float32)
    x[-1] = np.float32(9.0)  # a constant row (rstd = 1/sqrt(eps))
    gx, gw, gb = normlab.normalize_backward(g, x, "b [d]", weight=w, params="d", rms=rms, eps=1e-5)
    ex, ew, eb = torch_gradients(x, w, g, rms, 1e-5)
    assert gx.dtype == np.float32
    np.testing.assert_allclose(gx, ex, rtol=0, atol=1e-3 * np.abs(ex).max())
    np.testing.assert_allclose(gw, ew, rtol=1e-4, atol=1e-4 * np.abs(ew).max())
    if not rms:
        np.testing.assert_allclose(gb, eb, rtol=1e-4, atol=1e-4 * np.abs(eb).max())


@pytest.mark.parametrize("offset", [0, 1, 5, 15])
def test_streamed_row_gradients_at_every_offset_within_a_line_and_with_a_nan(offset):
    """grad_x of the torch twin, whose rows start at every offset within a line (rows of
    odd length), with a NaN in one row: confined to that row's x-gradient."""
    from normlab.torch import LayerNorm

    n = 4096 + offset
    x = torch.randn(ELEMENTS // n + 1, n) * 3 + 1
    x[2, 7] = float("nan")
    twin, reference = LayerNorm(n), torch.nn.LayerNorm(n, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.double().requires_grad_()
    g = torch.randn_like(x)
    twin(x1).backward(g)
    reference(x2).backward(g.double())
    assert torch.isnan(x1.grad[2]).all()
    keep = torch.arange(len(x)) != 2
    torch.testing.assert_close(x1.grad[keep], x2.grad[keep].float(), atol=2e-3, rtol=0)


def test_streamed_row_gradients_are_bit_identical_on_one_and_two_threads():
    from normlab import kernels

    n = 4096 + 3
    rng = np.random.default_rng(8)
    x = (7 + rng.standard_normal((ELEMENTS // n + 1, n))).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    results = []
    for count in (1, 2):
        with kernels.threads.at_most(count):
            results.append(b"".join(a.tobytes() for a in normlab.normalize_backward(g, x, "b [d]", weight=w,
                                                                                    params="d")))
    assert results[0] == results[1]
