"""Fused blocks of the NumPy API (residual, gate, modulation, weight offset) against torch.

Oracle: the block written from its definition in torch operations (float64), and torch
autograd on that composite for every gradient. Nothing here compares with our own output.
"""

import numpy as np
import pytest

import normlab
from normlab.errors import InputError, NormlabError

torch = pytest.importorskip("torch")
F = torch.nn.functional

ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu}


def torch_block(x, pattern_axes, *, residual=None, gate=None, activation="silu", norm_before_gate=True,
                weight=None, bias=None, offset=0.0, scale=None, shift=None, rms=False, eps=1e-5, groups=None):
    """The fused block in torch ops on (b, t, d) tensors; groups splits d as '(g [c])'."""
    total = x + residual if residual is not None else x
    h = total
    phi = ACTIVATIONS[activation](gate) if gate is not None else None
    if gate is not None and not norm_before_gate:
        h = h * phi
    shape = h.shape
    if groups:
        h = h.reshape(*shape[:-1], groups, shape[-1] // groups)
    if rms:
        h_hat = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        h_hat = (h - mean) * torch.rsqrt(var + eps)
    y = h_hat.reshape(shape)
    if weight is not None:
        y = y * (weight + offset)
    if scale is not None:
        y = y * (1 + scale[:, None, :])
    if shift is not None:
        y = y + shift[:, None, :]
    if bias is not None:
        y = y + bias
    if gate is not None and norm_before_gate:
        y = y * phi
    return y, total


CASES = {
    "residual rms": dict(residual=True, weight=True, rms=True),
    "residual layer norm with bias": dict(residual=True, weight=True, bias=True),
    "gemma offset": dict(residual=True, weight=True, offset=1.0, rms=True),
    "silu gate after norm": dict(gate="silu", weight=True, bias=True, rms=True),
    "silu gate before norm": dict(gate="silu", weight=True, rms=True, norm_before_gate=False),
    "sigmoid gate after layer norm": dict(gate="sigmoid", weight=True, bias=True),
    "gelu gate before layer norm": dict(gate="gelu", weight=True, bias=True, norm_before_gate=False),
    "grouped silu gate, 4 groups": dict(gate="silu", weight=True, rms=True, groups=4),
    "grouped gate before norm, 2 groups": dict(gate="silu", weight=True, rms=True, groups=2,
                                               norm_before_gate=False),
    "adaln modulation": dict(scale=True, shift=True),
    "modulation with weight, bias and residual": dict(scale=True, shift=True, weight=True, bias=True,
                                                      residual=True),
    "everything": dict(residual=True, gate="gelu", scale=True, shift=True, weight=True, bias=True, offset=0.5),
}


def _arrays(case, shape, seed):
    rng = np.random.default_rng(seed)
    b, t, d = shape
    arrays = {"x": rng.normal(size=shape) * 2 + 1}
    if case.get("residual"):
        arrays["residual"] = rng.normal(size=shape)
    if case.get("gate"):
        arrays["gate"] = rng.normal(size=shape) * 2
    if case.get("weight"):
        arrays["weight"] = rng.normal(size=d)
    if case.get("bias"):
        arrays["bias"] = rng.normal(size=d)
    if case.get("scale"):
        arrays["scale"] = rng.normal(size=(b, d)) * 0.5
    if case.get("shift"):
        arrays["shift"] = rng.normal(size=(b, d))
    return arrays


def _normlab_kwargs(case, arrays):
    groups = case.get("groups")
    pattern = "b t (g [c])" if groups else "b t [d]"
    kwargs = dict(rms=case.get("rms", False), eps=1e-5)
    if groups:
        kwargs["g"] = groups
    for name in ("residual", "gate", "weight", "bias", "scale", "shift"):
        if name in arrays:
            kwargs[name] = arrays[name]
    if case.get("gate"):
        kwargs.update(gate_activation=case["gate"], norm_before_gate=case.get("norm_before_gate", True))
    if "weight" in arrays or "bias" in arrays:
        kwargs["params"] = "(g c)" if groups else "d"
    if "scale" in arrays or "shift" in arrays:
        kwargs["modulation"] = "b (g c)" if groups else "b d"
    if case.get("offset"):
        kwargs["weight_offset"] = case["offset"]
    return pattern, kwargs


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_block_and_every_gradient_match_torch_autograd_on_the_composite(name, backend):
    case = CASES[name]
    shape = (2, 5, 16)
    arrays = _arrays(case, shape, seed=len(name))
    pattern, kwargs = _normlab_kwargs(case, arrays)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    y_t, total_t = torch_block(tensors["x"], None, residual=tensors.get("residual"), gate=tensors.get("gate"),
                               activation=case.get("gate") or "silu",
                               norm_before_gate=case.get("norm_before_gate", True),
                               weight=tensors.get("weight"), bias=tensors.get("bias"),
                               offset=case.get("offset", 0.0), scale=tensors.get("scale"),
                               shift=tensors.get("shift"), rms=case.get("rms", False), groups=case.get("groups"))
    rng = np.random.default_rng(7)
    grad_y = rng.normal(size=shape)
    grad_sum = rng.normal(size=shape) if case.get("residual") else None
    loss = (y_t * torch.tensor(grad_y)).sum()
    if grad_sum is not None:
        loss = loss + (total_t * torch.tensor(grad_sum)).sum()
    loss.backward()

    result = normlab.normalize(arrays["x"], pattern, backend=backend, **kwargs)
    if case.get("residual"):
        y, total = result
        np.testing.assert_allclose(total, total_t.detach().numpy(), rtol=0, atol=0)
    else:
        y = result
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-10, atol=1e-10)

    grads = normlab.normalize_backward(grad_y, arrays["x"], pattern, backend=backend, grad_sum=grad_sum, **kwargs)
    for field in ("x", "residual", "gate", "weight", "bias", "scale", "shift"):
        if field in tensors:
            np.testing.assert_allclose(getattr(grads, field), tensors[field].grad.numpy(), rtol=1e-9, atol=1e-9,
                                       err_msg=field)
        elif field not in ("x", "bias"):  # a bias gradient comes with params, as in normalize_backward
            assert getattr(grads, field) is None, field


# ---------------------------------------------------------------------------------------
# The numerics contract, through the fused blocks


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_constant_sum_normalizes_to_exactly_shift_plus_bias(backend):
    x = np.array([[[5.0, 1.0, 2.0, 0.5]]], dtype=np.float32)
    residual = np.float32(7.0) - x  # x + r == 7 everywhere
    bias = np.array([0.25, -1.0, 0.0, 3.0], np.float32)
    shift = np.array([[0.5, 0.5, -0.25, 1.0]], np.float32)
    y, total = normlab.normalize(x, "b t [d]", residual=residual, weight=np.full(4, 3.0, np.float32),
                                 bias=bias, params="d", scale=np.ones((1, 4), np.float32), shift=shift,
                                 modulation="b d", backend=backend)
    assert (total == 7.0).all()
    assert (y[0, 0] == (shift[0].astype(np.float64) + bias).astype(np.float32)).all()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_symmetric_sum_has_an_exact_zero_middle_and_opposite_ends(backend):
    x = np.array([[1.0, 3.0, 0.5]], np.float32)
    y, _ = normlab.normalize(x, "b [d]", residual=np.array([[3.0, 0.0, 1.5]], np.float32), backend=backend)
    assert y[0, 1] == 0.0 and y[0, 0] == -y[0, 2]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_large_offset_sum_stays_within_1e_4_of_float64(backend):
    rng = np.random.default_rng(0)
    x = np.full((4, 256), 1e6, np.float32)
    residual = rng.normal(size=(4, 256)).astype(np.float32)
    y, total = normlab.normalize(x, "b [d]", residual=residual, backend=backend)
    t64 = torch.tensor(total.astype(np.float64))
    expected = torch.nn.functional.layer_norm(t64, (256,), eps=1e-5).numpy()
    assert np.abs(y - expected).max() < 1e-4


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_nan_in_residual_stays_in_its_row_forward_and_backward(backend):
    rng = np.random.default_rng(1)
    x, r, z = (rng.normal(size=(3, 8)) for _ in range(3))
    r[1, 2] = np.nan
    kwargs = dict(residual=r, gate=z, weight=np.ones(8), params="d", backend=backend)
    y, _ = normlab.normalize(x, "b [d]", **kwargs)
    grads = normlab.normalize_backward(np.ones_like(x), x, "b [d]", **kwargs)
    for array in (y, grads.x, grads.gate):
        assert np.isnan(array[1]).any() and np.isfinite(array[[0, 2]]).all()


def test_fused_kernels_give_the_same_bits_on_one_and_two_threads(every_call_threaded):
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(2)
    shape = (4, 33, 40)
    arrays = dict(x=rng.normal(size=shape).astype(np.float32), residual=rng.normal(size=shape).astype(np.float32),
                  gate=rng.normal(size=shape).astype(np.float32), weight=rng.normal(size=40).astype(np.float32),
                  bias=rng.normal(size=40).astype(np.float32), scale=rng.normal(size=(4, 40)).astype(np.float32))
    grad_y = rng.normal(size=shape).astype(np.float32)
    kwargs = {k: v for k, v in arrays.items() if k != "x"}

    def run():
        y, total = normlab.normalize(arrays["x"], "b t [d]", params="d", modulation="b d", backend="numba",
                                     **kwargs)
        g = normlab.normalize_backward(grad_y, arrays["x"], "b t [d]", params="d", modulation="b d",
                                       backend="numba", grad_sum=grad_y, **kwargs)
        return [y, total, g.x, g.gate, g.weight, g.bias, g.scale]

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_fused_normalize_leaves_its_inputs_unmodified(backend):
    rng = np.random.default_rng(3)
    arrays = dict(residual=rng.normal(size=(2, 6)), gate=rng.normal(size=(2, 6)), weight=rng.normal(size=6))
    x = rng.normal(size=(2, 6))
    copies = {k: v.copy() for k, v in arrays.items()}
    x_copy = x.copy()
    normlab.normalize(x, "b [d]", params="d", backend=backend, **arrays)
    normlab.normalize_backward(np.ones_like(x), x, "b [d]", params="d", backend=backend, grad_sum=np.ones_like(x),
                               **arrays)
    assert (x == x_copy).all() and all((arrays[k] == copies[k]).all() for k in arrays)


def test_modulation_gradients_keep_their_own_dtype_beside_a_weight_of_another():
    # float64 scale and shift beside a float16 weight: their gradients were rounded to float16
    rng = np.random.default_rng(4)
    arrays = dict(x=rng.normal(size=(2, 3, 8)), weight=rng.normal(size=8), scale=rng.normal(size=(2, 8)),
                  shift=rng.normal(size=(2, 8)))
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    y, _ = torch_block(tensors["x"], None, weight=tensors["weight"].half().double(), scale=tensors["scale"],
                       shift=tensors["shift"])
    y.sum().backward()
    grads = normlab.normalize_backward(np.ones((2, 3, 8)), arrays["x"], "b t [d]", weight=arrays["weight"].astype(
        np.float16), params="d", scale=arrays["scale"], shift=arrays["shift"], modulation="b d")
    for name in ("scale", "shift"):
        assert getattr(grads, name).dtype == np.float64
        np.testing.assert_allclose(getattr(grads, name), tensors[name].grad.numpy(), rtol=1e-12, atol=1e-12)
    assert grads.weight.dtype == np.float16


@pytest.mark.parametrize("kwargs, kind, words", [
    (dict(gate=np.ones((2, 3))), "ShapeError", ["'b t [d]'", "(2, 4, 5)", "gate", "(2, 3)"]),
    (dict(gate=np.ones((2, 4, 5)), gate_activation="relu"), "InputError", ["silu", "'relu'", "'b t [d]'", "(2, 4, 5)"]),
    (dict(residual=np.ones((2, 4, 5)), gate_activation="relu"), "InputError", ["silu", "'relu'", "'b t [d]'"]),
    (dict(scale=np.ones((2, 5))), "ParamsError", ["modulation", "'b t [d]'"]),
    (dict(scale=np.ones((2, 4)), modulation="b d"), "ParamsError", ["modulation='b d'", "(2, 5)", "(2, 4)"]),
    (dict(weight_offset=1.0), "ParamsError", ["weight_offset", "weight="]),
    (dict(residual=np.ones((4, 5))), "ShapeError", ["residual", "(4, 5)", "(2, 4, 5)"]),
])
def test_bad_fused_arguments_fail_with_a_clear_value_error(kwargs, kind, words):
    with pytest.raises(NormlabError) as info:
        normlab.normalize(np.ones((2, 4, 5)), "b t [d]", **kwargs)
    assert isinstance(info.value, ValueError) and type(info.value).__name__ == kind
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("shape, axes", [((4,), "s"), ((2, 4), "b s"), ((7,), None)])
def test_a_norms_own_scale_passed_as_scale_is_pointed_to_weight(shape, axes):
    # Flax and ONNX call a norm's weight "scale"; normlab's scale= is AdaLN's (1 + scale), and
    # the message offered modulation='b d' (an axis 'b t [s]' lacks), which gives x̂·(1 + scale)
    with pytest.raises(NormlabError) as info:
        normlab.normalize(np.ones((2, 3, 4)), "b t [s]", scale=np.ones(shape), bias=np.zeros(4), params="s")
    message = str(info.value)
    assert "1 + scale" in message and "weight=" in message and "'b d'" not in message
    if axes is None:
        assert "from b, t, s" in message
    else:
        assert f"params={axes!r}" in message and f"modulation={axes!r}" in message


@pytest.mark.parametrize("extra", [{}, dict(mask=np.ones((2, 4, 5), bool))], ids=["plain", "masked"])
@pytest.mark.parametrize("kwargs, words", [
    (dict(gate_activation="relu"), ["gate_activation", "silu", "'relu'"]),
    (dict(norm_before_gate="no"), ["norm_before_gate", "True or False", "'no'"]),
])
@pytest.mark.parametrize("function", ["normalize", "normalize_backward"])
def test_a_misspelt_gate_option_is_refused_without_any_fused_option_as_with_one(function, kwargs, words, extra):
    # without a gate, residual or modulation the options were not read at all: a typo passed
    x = np.random.default_rng(0).normal(size=(2, 4, 5))
    call = getattr(normlab, function)
    args = (x, "b t [d]") if function == "normalize" else (np.ones_like(x), x, "b t [d]")
    unchanged = call(*args, **extra)  # (and normalize's fast path now knows the call)
    with pytest.raises(InputError) as info:
        call(*args, **kwargs, **extra)
    for word in (*words, "'b t [d]'", "(2, 4, 5)"):
        assert word in str(info.value)
    # the right spellings without a gate change nothing, as gate=None in transformers' gated norms
    valid = dict(gate_activation="sigmoid", norm_before_gate=False)
    np.testing.assert_array_equal(np.asarray(call(*args, **valid, **extra)[0]), np.asarray(unchanged[0]))


@pytest.mark.parametrize("extra", [{}, dict(gate=np.ones((2, 4, 5)))], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", [np.array(["silu", "gelu"]), np.array(["silu"]), np.array("silu"),
                                        np.array([True, False])], ids=["two names", "one name", "0-d", "bools"])
@pytest.mark.parametrize("function", ["normalize", "normalize_backward"])
def test_a_gate_activation_given_as_an_array_is_an_input_error_naming_the_pattern(function, activation, extra):
    # an array was compared elementwise: NumPy's "truth value of an array ... is ambiguous", or a
    # TypeError (unhashable) from a one-element array that passed the check
    x = np.random.default_rng(0).normal(size=(2, 4, 5))
    call = getattr(normlab, function)
    args = (x, "b t [d]") if function == "normalize" else (np.ones_like(x), x, "b t [d]")
    with pytest.raises(InputError) as info:
        call(*args, gate_activation=activation, **extra)
    for word in ("gate_activation", "silu, sigmoid, gelu", "an array of shape", "as a str", "'b t [d]'", "(2, 4, 5)"):
        assert word in str(info.value)


@pytest.mark.parametrize("call", [
    lambda x: normlab.normalize(x, "b t [d]", weight=np.ones(5), params="d", residual=x),
    lambda x: normlab.normalize_backward(np.ones_like(x), x, "b t [d]"),
    lambda x: normlab.normalize_backward(np.ones_like(x), x, "b t [d]", weight=np.ones(5), params="d", residual=x),
], ids=["fused", "backward", "fused backward"])
def test_the_default_gate_options_build_no_message_on_each_call(call, monkeypatch):
    # the check of a typo built its message (the pattern and the shape) on every call, seven Python
    # calls each time, where the defaults need no check
    from normlab import fused

    checked = []
    monkeypatch.setattr(fused, "check_gate_options", lambda *args: checked.append(args) or True)
    call(np.random.default_rng(0).normal(size=(2, 4, 5)))
    assert checked == []


@pytest.mark.parametrize("out", [np.empty((2, 4, 4)), np.empty((2, 4, 5), np.float32), [[0.0]]])
def test_a_wrong_out_fails_before_the_fused_block_runs(out, monkeypatch):
    """A wrong ``out=`` is refused before any work (as the unfused call refuses it), and
    nothing runs: neither the kernels nor the reference."""
    from normlab import fused
    from normlab.kernels import fused as fused_kernels

    def must_not_run(*args, **kwargs):
        raise AssertionError("the fused forward ran before out= was checked")

    monkeypatch.setattr(fused_kernels, "forward", must_not_run)
    monkeypatch.setattr(fused, "reference_forward", must_not_run)
    with pytest.raises(NormlabError, match="out"):
        normlab.normalize(np.ones((2, 4, 5)), "b t [d]", residual=np.zeros((2, 4, 5)), out=out)


def test_kernel_exponential_is_within_two_ulp_of_numpy_and_keeps_nan():
    pytest.importorskip("numba")
    import numba

    from normlab.kernels.gates import vector_exp

    @numba.njit
    def apply(values, out):
        for i in range(values.shape[0]):
            out[i] = vector_exp(values[i])

    values = np.concatenate([np.linspace(-700, 700, 100_001), np.random.default_rng(4).normal(size=10_000) * 5])
    out = np.empty_like(values)
    apply(values, out)
    expected = np.exp(values)
    assert (np.abs(out - expected) <= 2 * np.spacing(expected)).all()
    edges = np.array([np.nan, np.inf, 710.0, -np.inf, -800.0])
    got = np.empty_like(edges)
    apply(edges, got)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == np.inf and 0 <= got[3] < 1e-300 and got[4] < 1e-300


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("pattern, shape, params, sizes", [
    ("b (g [c]) [s]", (2, 4, 3), "(g c)", {"g": 2}),  # group norm: each channel repeats along s
    ("b [c s]", (2, 4, 3), "c", {}),                   # ConvNeXt's layer norm with per-channel parameters
])
def test_the_bias_gradient_of_a_residual_block_without_parameters_is_torch_autograds(backend, pattern, shape, params,
                                                                                    sizes):
    """params= with no weight or bias asks for the bias gradient alone; the kernels folded it
    as if each channel's columns were tiled (c0 c1 c0 c1 ...), not repeated (c0 c0 c1 c1 ...),
    and returned wrong numbers where each channel spans several columns of a row."""
    rng = np.random.default_rng(7)
    x, residual, grad_y = (rng.standard_normal(shape) for _ in range(3))
    got = normlab.normalize_backward(grad_y, x, pattern, params=params, residual=residual, backend=backend, **sizes)
    tx = torch.tensor(x, requires_grad=True)
    bias = torch.zeros(shape[1], dtype=torch.float64, requires_grad=True)
    groups = sizes.get("g", 1)
    F.group_norm(tx + torch.tensor(residual), groups, torch.ones(shape[1], dtype=torch.float64), bias).backward(
        torch.tensor(grad_y))
    np.testing.assert_allclose(got.bias, bias.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.x, tx.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtypes", [
    dict(x="float32", gate="float64"), dict(x="float64", gate="float32"), dict(x="float32", gate="float16"),
    dict(x="float32", residual="float64"), dict(x="float64", residual="float32"), dict(x="float16", residual="float32"),
    dict(x="float32", residual="float16", gate="float64"),
])
def test_each_input_gradient_has_that_inputs_dtype_as_in_torch_autograd(dtypes, backend):
    """The gate's gradient was rounded to the result's dtype (float32 for a float64 gate on
    float32 x), and x's to the sum's (float64 for float32 x beside a float64 residual), where
    torch autograd gives every input a gradient of its own dtype."""
    rng = np.random.default_rng(11)
    shape = (2, 3, 8)
    arrays = {name: (rng.standard_normal(shape) * (2 if name == "gate" else 1)).astype(dtype)
              for name, dtype in dtypes.items()}
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in arrays.items()}
    y_t, total_t = torch_block(tensors["x"], None, residual=tensors.get("residual"), gate=tensors.get("gate"),
                               rms=True)
    grad_y = rng.standard_normal(shape)
    grad_sum = rng.standard_normal(shape) if "residual" in arrays else None
    loss = (y_t * torch.tensor(grad_y, dtype=y_t.dtype)).sum()
    if grad_sum is not None:
        loss = loss + (total_t * torch.tensor(grad_sum, dtype=total_t.dtype)).sum()
    loss.backward()

    grads = normlab.normalize_backward(grad_y, arrays["x"], "b t [d]", rms=True, backend=backend, grad_sum=grad_sum,
                                       **{k: v for k, v in arrays.items() if k != "x"})
    narrowest = max(np.finfo(np.dtype(d)).eps for d in dtypes.values())
    tolerance = 1e-6 if narrowest < 1e-10 else 1e-4 if narrowest < 1e-6 else 2e-2
    for name in arrays:
        got, expected = getattr(grads, name), tensors[name].grad.numpy()
        assert got.dtype == expected.dtype, name
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_x_and_residual_of_one_dtype_share_one_gradient_array(dtype):
    x = residual = np.array([[1, 2, 3, 5], [0, 4, 1, 1]], dtype)
    grads = normlab.normalize_backward(np.ones((2, 4), dtype), x, "b [d]", residual=residual)
    assert grads.residual is grads.x and grads.x.dtype == np.dtype(dtype)


@pytest.mark.parametrize("call", [
    lambda x, **kw: normlab.normalize(x, "b t [d]", **kw),
    lambda x, **kw: normlab.normalize_backward(np.ones_like(x), x, "b t [d]", **kw),
], ids=["normalize", "normalize_backward"])
@pytest.mark.parametrize("extra", [{}, dict(weight=np.ones(4), params="d"), dict(residual=np.ones((2, 3, 4)))])
def test_modulation_without_scale_or_shift_is_refused_not_a_plain_norm(call, extra):
    """modulation= with neither scale= nor shift= (one forgotten) was taken, silently, as a
    plain norm."""
    with pytest.raises(InputError) as info:
        call(np.arange(24.0).reshape(2, 3, 4), modulation="b d", **extra)
    for words in ("'b t [d]'", "(2, 3, 4)", "modulation='b d'", "scale=", "shift=", "(2, 4)", "drop modulation="):
        assert words in str(info.value)
