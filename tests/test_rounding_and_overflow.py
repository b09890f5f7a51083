"""Two numerical edges: float16 results are rounded once (float64 -> float16), and a
float64 variance that overflows gives NaN, never silent zeros, on both backends.

Oracles: the float64 definition rounded to float16 by Python's ``struct`` (correctly
rounded, independent of NumPy), and for overflow torch's ``layer_norm``/``group_norm``
(NaN) and scale invariance (the true result is x/1e200's normalization, far from zero).
"""

import struct
import warnings

import numpy as np
import pytest

import normlab

BACKENDS = ["numba", "numpy"]
# (pattern, shape, reduced axes of the expanded view, sizes): 131,584 elements each
CASES = [
    ("b [d]", (257, 512), (1,), {}),
    ("[b] d", (257, 512), (0,), {}),
    ("[b] c [s]", (64, 8, 257), (0, 2), {}),
    ("b (g [c]) [s]", (16, 32, 257), (2, 3), {"g": 4}),
]


def _round_once_to_float16(values: np.ndarray) -> np.ndarray:
    """Each float64 value rounded to the nearest float16 (ties to even) in one step."""
    flat = values.reshape(-1)
    packed = struct.pack(f"<{flat.size}e", *flat.tolist())
    return np.frombuffer(packed, np.float16).reshape(values.shape)


def _expanded(x, pattern, sizes):
    return x.reshape(x.shape[0], sizes["g"], -1, x.shape[2]) if "g" in sizes else x


def _forward_definition(x, axes, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    return centered / np.sqrt((centered ** 2).mean(axis=axes, keepdims=True) + eps)


def _backward_definition(grad_y, x, axes, eps=1e-5):
    """∂L/∂x = rstd·(g − mean(g) − x̂·mean(g·x̂)) for y = x̂ = (x − mean)·rstd."""
    x, g = np.asarray(x, np.float64), np.asarray(grad_y, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    x_hat = (x - mean) * rstd
    return rstd * (g - g.mean(axis=axes, keepdims=True) - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))


@pytest.mark.parametrize("pattern, shape, axes, sizes", CASES, ids=[c[0] for c in CASES])
def test_float16_output_is_the_float64_result_rounded_once_on_both_backends(pattern, shape, axes, sizes):
    x = (np.random.default_rng(0).standard_normal(shape) * 3 + 1).astype(np.float16)
    want = _round_once_to_float16(_forward_definition(_expanded(x, pattern, sizes), axes, eps=1e-5)).reshape(shape)
    for backend in BACKENDS:
        got = normlab.normalize(x, pattern, backend=backend, **sizes)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=backend)


@pytest.mark.parametrize("pattern, shape, axes, sizes", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_float16_gradient_is_the_float64_result_rounded_once_on_both_backends(pattern, shape, axes, sizes):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float16)
    grad_y = rng.standard_normal(shape).astype(np.float16)
    want = _round_once_to_float16(_backward_definition(grad_y, x, axes))
    for backend in BACKENDS:
        grad_x, _, _ = normlab.normalize_backward(grad_y, x, pattern, backend=backend, **sizes)
        assert grad_x.dtype == np.float16
        np.testing.assert_array_equal(grad_x.view(np.uint16), want.view(np.uint16), err_msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_out_receives_the_result_rounded_once(backend):
    pattern, shape, axes, _ = CASES[0]
    x = (np.random.default_rng(2).standard_normal(shape) * 3 + 1).astype(np.float16)
    out = np.empty(shape, np.float16)
    normlab.normalize(x, pattern, out=out, backend=backend)
    want = _round_once_to_float16(_forward_definition(x, axes))
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))


# --- overflow -------------------------------------------------------------------------------

HUGE = np.array([[1e200, -1e200, 3e200, 0.0], [1.0, 2.0, 3.0, 4.0]])  # row 0's variance overflows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_a_row_whose_variance_overflows_is_nan_and_the_other_rows_are_untouched(backend, rms):
    y = normlab.normalize(HUGE, "b [d]", rms=rms, backend=backend)
    assert np.isnan(y[0]).all()
    scaled = normlab.normalize(HUGE[:1] / 1e200, "b [d]", rms=rms, backend="numpy")
    assert np.abs(scaled).max() > 0.5  # the true result, by scale invariance, is far from zero
    clean = HUGE[1:]
    want = clean / np.sqrt((clean ** 2).mean() + 1e-5) if rms else _forward_definition(clean, (1,))
    np.testing.assert_allclose(y[1:], want, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_a_channel_whose_variance_overflows_is_nan_in_batch_norm(backend, rms):
    channels_last = np.ascontiguousarray(HUGE.T)  # (4, 2): channel 0 overflows
    y = normlab.normalize(channels_last, "[b] c", rms=rms, backend=backend)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()
    channels_first = np.ascontiguousarray(np.broadcast_to(HUGE.T[None, :, :, None], (3, 4, 2, 5)).transpose(0, 2, 1, 3))
    y = normlab.normalize(channels_first, "[b] c [h w]", rms=rms, backend=backend)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_gradient_of_an_overflowed_row_is_nan(backend):
    grad_x, grad_w, _ = normlab.normalize_backward(np.ones_like(HUGE), HUGE, "b [d]", weight=np.ones(4), params="d",
                                                   backend=backend)
    assert np.isnan(grad_x[0]).all() and np.isfinite(grad_x[1]).all()
    assert np.isnan(grad_w).all()


def test_torch_also_gives_nan_for_an_overflowed_layer_and_group_norm():
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(HUGE[:1].copy())
    assert torch.isnan(torch.nn.functional.layer_norm(x, (4,))).all()
    assert torch.isnan(torch.nn.functional.group_norm(x.reshape(1, 2, 2), 1)).all()
    assert np.isnan(normlab.normalize(HUGE[:1], "b [d]")).all()
    assert np.isnan(normlab.normalize(HUGE[:1].reshape(1, 2, 2), "b (g [c]) [s]", g=1)).all()


# --- the same two edges with mask= and segment_ids= -----------------------------------------


def test_masked_float16_output_is_the_float64_result_rounded_once_on_both_backends():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((257, 512)) * 3 + 1).astype(np.float16)
    counted = rng.random((257, 512)) > 0.1
    wide = x.astype(np.float64)
    mean = np.array([row[keep].mean() for row, keep in zip(wide, counted)])[:, None]
    var = np.array([row[keep].var() for row, keep in zip(wide, counted)])[:, None]
    want = _round_once_to_float16((wide - mean) / np.sqrt(var + 1e-5))  # every element, counted ones' statistics
    for backend in BACKENDS:
        got = normlab.normalize(x, "b [d]", mask=counted, backend=backend)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_an_overflowed_masked_or_segmented_group_is_nan(backend, rms):
    y = normlab.normalize(HUGE, "b [d]", mask=np.ones(HUGE.shape, bool), rms=rms, backend=backend)
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    y = normlab.normalize(HUGE, "b [d]", segment_ids=np.array([0, 0, 1, 1]), rms=rms, backend=backend)
    assert np.isnan(y[0]).all() and np.isfinite(y[1]).all()
    y = normlab.normalize(np.ascontiguousarray(HUGE.T), "[b] d", mask=np.ones(HUGE.T.shape, bool), rms=rms,
                          backend=backend)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()


# --- a result past its dtype's range: ±inf as torch gives it, without NumPy's warning -------

# (x, weight, bias): float16 rows whose affine output and gradients pass 65504
_PAST_FLOAT16 = (np.array([[-1.0, 0.0, 2.0], [1.0, 3.0, 9.0]], np.float16), np.full(3, 60000.0, np.float16),
                 np.full(3, 60000.0, np.float16))


def _torch_batch_norm_bias_gradient(torch, x, w, b):
    b = b.clone().requires_grad_()
    torch.nn.functional.batch_norm(x, None, None, w, b, training=True).backward(torch.full_like(x, 60000.0))
    return b.grad


# each: normlab's call, and torch's in float64 rounded to float16 (where torch gives inf, silently)
_RESULTS_PAST_THE_DTYPE = {
    "forward": (lambda x, w, b, backend: normlab.normalize(x, "b [f]", weight=w, bias=b, params="f", backend=backend),
                lambda torch, x, w, b: torch.nn.functional.layer_norm(x, (3,), w, b)),
    "out": (lambda x, w, b, backend: normlab.normalize(x, "b [f]", weight=w, bias=b, params="f", backend=backend,
                                                      out=np.empty_like(x)),
            lambda torch, x, w, b: torch.nn.functional.layer_norm(x, (3,), w, b)),
    "mask": (lambda x, w, b, backend: normlab.normalize(x, "[b] f", weight=w, bias=b, params="f", backend=backend,
                                                       mask=np.ones(x.shape, bool)),
             lambda torch, x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, training=True)),
    "residual": (lambda x, w, b, backend: normlab.normalize(np.stack([w, b]), "b [f]", backend=backend,
                                                           residual=np.stack([w, b]))[1],
                 lambda torch, x, w, b: torch.stack([w, b]).half() + torch.stack([w, b]).half()),
    "backward": (lambda x, w, b, backend: normlab.normalize_backward(np.full_like(x, 60000.0), x, "[b] f", weight=w,
                                                                     params="f", backend=backend)[2],
                 _torch_batch_norm_bias_gradient),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, torch_call", _RESULTS_PAST_THE_DTYPE.values(), ids=list(_RESULTS_PAST_THE_DTYPE))
def test_a_float16_result_past_its_range_is_inf_as_in_torch_without_a_numpy_warning(backend, call, torch_call):
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "overflow encountered in cast" leaked from normlab here
        got = call(*_PAST_FLOAT16, backend)
    want = torch_call(torch, *(torch.from_numpy(a).double() for a in _PAST_FLOAT16)).half().numpy()
    assert np.isinf(want).any()
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2e-3)


def test_batch_norm_moves_both_float16_running_statistics_to_inf_as_torch_does_without_a_warning():
    torch = pytest.importorskip("torch")
    x = np.array([[-60000.0, 1.0], [60000.0, 2.0], [0.0, 3.0]], np.float16)  # channel 0's variance passes 65504
    running = [np.zeros(2, np.float16), np.ones(2, np.float16)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning, as an error, left running_var unmoved behind a moved mean
        normlab.functional.batch_norm(x, *running, training=True)
        normlab.functional.instance_norm(np.ascontiguousarray(x.T[None]), *running, momentum=0.5)
    torch_running = [torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.float16)]
    torch.nn.functional.batch_norm(torch.from_numpy(x), *torch_running, training=True)
    torch.nn.functional.instance_norm(torch.from_numpy(np.ascontiguousarray(x.T[None])), *torch_running, momentum=0.5)
    for got, want in zip(running, torch_running):
        np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("name, args, shape", [("LayerNorm", (6,), (4, 6)), ("RMSNorm", (6,), (4, 6)),
                                               ("BatchNorm1d", (6,), (4, 6))])
def test_a_torch_modules_float32_gradient_past_its_range_is_inf_as_torch_nn_gives_it(name, args, shape):
    """The modules' kernels sum parameter gradients in float64; rounding them to float32 raised
    NumPy's "overflow encountered in cast" inside loss.backward() (an error under -W error)."""
    torch = pytest.importorskip("torch")
    import normlab.torch

    torch.manual_seed(0)
    x = torch.randn(*shape)
    grad_y = torch.full(shape, 3e38)  # summed over the batch for the parameters: past float32's 3.4e38
    twin, reference = getattr(normlab.torch, name)(*args), getattr(torch.nn, name)(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin(x).backward(grad_y)
    reference(x).backward(grad_y)
    # RMS norm's weight gradient (a sum of x̂·g), the others' bias gradient (a sum of g)
    want, got = ((module.weight if name == "RMSNorm" else module.bias).grad for module in (reference, twin))
    assert torch.isinf(want).any()
    np.testing.assert_array_equal(np.isinf(got.numpy()), np.isinf(want.numpy()))


@pytest.mark.parametrize("name, shape", [("LayerNorm", (4, 6)), ("RMSNorm", (4, 6)), ("BatchNorm1d", (4, 6))])
def test_a_torch_modules_backward_rounds_its_parameter_gradients_without_numpys_errstate(name, shape):
    """The quiet rounding above is torch's cast in the modules' backward: np.errstate is a
    Python context manager, three Python calls for each gradient on every backward of a
    small layer (counted, not timed)."""
    import sys

    torch = pytest.importorskip("torch")
    import normlab.torch

    module, x = getattr(normlab.torch, name)(shape[1]), torch.randn(*shape, requires_grad=True)
    module(x).sum().backward()  # (the first call builds the cached kernel calls)
    entered = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith("_ufunc_config.py"):
            entered.append(frame.f_code.co_name)

    y = module(x).sum()
    sys.setprofile(profile)
    try:
        y.backward()
    finally:
        sys.setprofile(None)
    assert entered == [] and module.weight.grad is not None
