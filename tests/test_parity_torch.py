"""normlab against PyTorch: every named norm through both normalize and functional, and
random patterns through hypothesis, forward and backward, float32 and float64."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normlab
from tests.cases import NAMED_NORMS, random_inputs

torch = pytest.importorskip("torch")
F = torch.nn.functional

EPS = 1e-5
TOLERANCE = {np.float32: dict(rtol=1e-4, atol=3e-5), np.float64: dict(rtol=1e-9, atol=1e-10)}
DTYPES = [np.float32, np.float64]
CASE_IDS = [case.name for case in NAMED_NORMS]


def _t(array, grad=False):
    return None if array is None else torch.tensor(array, requires_grad=grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NAMED_NORMS, ids=CASE_IDS)
def test_normalize_matches_torch_forward(case, dtype):
    x, weight, bias, _ = random_inputs(case, dtype)
    expected = case.torch_fn(_t(x), _t(weight), _t(bias), EPS).detach().numpy()
    y = normlab.normalize(x, case.pattern, weight=weight, bias=bias, params=case.params, eps=EPS, rms=case.rms,
                          **case.sizes)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NAMED_NORMS, ids=CASE_IDS)
def test_functional_matches_torch_forward(case, dtype):
    x, weight, bias, _ = random_inputs(case, dtype, seed=1)
    expected = case.torch_fn(_t(x), _t(weight), _t(bias), EPS).detach().numpy()
    y = case.numpy_fn(x, weight, bias, EPS)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NAMED_NORMS, ids=CASE_IDS)
def test_normalize_backward_matches_torch_autograd(case, dtype):
    x, weight, bias, grad_y = random_inputs(case, dtype, seed=2)
    xt, wt, bt = _t(x, True), _t(weight, True), _t(bias, True)
    case.torch_fn(xt, wt, bt, EPS).backward(torch.tensor(grad_y))
    grad_x, grad_w, grad_b = normlab.normalize_backward(
        grad_y, x, case.pattern, weight=weight, params=case.params, eps=EPS, rms=case.rms, **case.sizes
    )
    tol = {np.float32: dict(rtol=1e-3, atol=2e-4), np.float64: dict(rtol=1e-8, atol=1e-9)}[dtype]
    assert grad_x.dtype == dtype and grad_w.dtype == dtype
    np.testing.assert_allclose(grad_x, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(grad_w, wt.grad.numpy(), **tol)
    if case.has_bias:
        np.testing.assert_allclose(grad_b, bt.grad.numpy(), **tol)


@pytest.mark.parametrize("case", NAMED_NORMS, ids=CASE_IDS)
def test_backward_reuses_returned_statistics(case):
    x, weight, bias, grad_y = random_inputs(case, np.float64, seed=3)
    _, mean, rstd = normlab.normalize(x, case.pattern, weight=weight, params=case.params, rms=case.rms,
                                      return_stats=True, **case.sizes)
    fresh = normlab.normalize_backward(grad_y, x, case.pattern, weight=weight, params=case.params, rms=case.rms,
                                       **case.sizes)
    reused = normlab.normalize_backward(grad_y, x, case.pattern, weight=weight, params=case.params, rms=case.rms,
                                        mean=mean, rstd=rstd, **case.sizes)
    # the oracle here is the fresh computation, itself checked against torch above;
    # a wrong reuse (e.g. of rstd as std) is far outside this tolerance
    for a, b in zip(fresh, reused):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# ---- random patterns ----------------------------------------------------------------------


@st.composite
def patterns_and_inputs(draw):
    """A random rank-1..4 expanded shape with a nonempty set of reduced axes, written as a
    pattern that may merge two adjacent axes into a composition and may write a leading
    run of like axes as '...'; maybe params over some named axes."""
    rank = draw(st.integers(1, 4))
    expanded = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    reduced = draw(st.lists(st.booleans(), min_size=rank, max_size=rank).filter(any))
    names = [f"a{i}" for i in range(rank)]
    tokens = [f"[{n}]" if r else n for n, r in zip(names, reduced)]
    shape = list(expanded)
    dims = [[i] for i in range(rank)]  # expanded axes behind each input dim
    composed = rank >= 2 and draw(st.booleans())
    if composed:  # merge axes k and k+1 into one input dim "(ak ak+1)"
        k = draw(st.integers(0, rank - 2))
        inner = lambda i: f"[{names[i]}]" if reduced[i] else names[i]
        if reduced[k] and reduced[k + 1]:
            merged = f"[({names[k]} {names[k + 1]})]"
        else:
            merged = f"({inner(k)} {inner(k + 1)})"
        tokens[k : k + 2] = [merged]
        shape[k : k + 2] = [expanded[k] * expanded[k + 1]]
        dims[k : k + 2] = [[k, k + 1]]
    sizes = {names[dims[k][0]]: expanded[dims[k][0]] for k in range(len(dims)) if len(dims[k]) == 2}
    leading = 0
    if not composed or len(dims[0]) == 1:
        while leading < len(dims) and len(dims[leading]) == 1 and reduced[dims[leading][0]] == reduced[0]:
            leading += 1
    ellipsis = leading > 0 and draw(st.booleans())
    if ellipsis:
        count = draw(st.integers(1, leading))
        tokens[:count] = ["[...]" if reduced[0] else "..."]
    spanned = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
    if ellipsis:
        spanned[:count] = [False] * count
    params = " ".join(n for n, on in zip(names, spanned) if on) or None
    dtype = draw(st.sampled_from(DTYPES))
    rms = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return (tuple(shape), expanded, reduced, spanned if params else None, " ".join(tokens), params, sizes, dtype,
            rms, seed)


def _torch_oracle(x, reduced, spanned, weight, bias, rms, eps):
    """PyTorch's own layer_norm / rms_norm over the reduced axes moved last."""
    kept = [i for i, r in enumerate(reduced) if not r]
    red = [i for i, r in enumerate(reduced) if r]
    moved = x.permute(*kept, *red)
    flat = moved.reshape(*moved.shape[: len(kept)], -1)
    n = flat.shape[-1]
    normed = F.rms_norm(flat, (n,), eps=eps) if rms else F.layer_norm(flat, (n,), eps=eps)
    y = normed.reshape(moved.shape).permute(*np.argsort(kept + red).tolist())
    if spanned is not None:
        broadcast = [s if on else 1 for s, on in zip(x.shape, spanned)]
        y = y * weight.reshape(broadcast) + bias.reshape(broadcast)
    return y


@given(patterns_and_inputs())
def test_random_patterns_match_torch_forward_and_backward(drawn):
    shape, expanded, reduced, spanned, pattern, params, sizes, dtype, rms, seed = drawn
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    grad_y = rng.standard_normal(shape).astype(dtype)
    param_shape = tuple(s for s, on in zip(expanded, spanned or ()) if on)
    weight = rng.standard_normal(param_shape).astype(dtype) if params else None
    bias = rng.standard_normal(param_shape).astype(dtype) if params else None

    xt, wt, bt = _t(x, True), _t(weight, True), _t(bias, True)
    expected = _torch_oracle(xt.reshape(expanded), reduced, spanned, wt, bt, rms, EPS).reshape(shape)
    expected.backward(torch.tensor(grad_y))

    y = normlab.normalize(x, pattern, weight=weight, bias=bias, params=params, rms=rms, eps=EPS, **sizes)
    grad_x, grad_w, grad_b = normlab.normalize_backward(grad_y, x, pattern, weight=weight, params=params, rms=rms,
                                                        eps=EPS, **sizes)
    tol = {np.float32: dict(rtol=2e-3, atol=2e-4), np.float64: dict(rtol=1e-7, atol=1e-8)}[dtype]
    np.testing.assert_allclose(y, expected.detach().numpy(), **tol)
    np.testing.assert_allclose(grad_x, xt.grad.numpy(), **tol)
    if params:
        np.testing.assert_allclose(grad_w, wt.grad.numpy(), **tol)
        np.testing.assert_allclose(grad_b, bt.grad.numpy(), **tol)


@given(patterns_and_inputs())
def test_returned_statistics_match_torch_var_mean(drawn):
    shape, expanded, reduced, _, pattern, _, sizes, dtype, rms, seed = drawn
    x = (np.random.default_rng(seed).standard_normal(shape) * 3 + 1).astype(dtype)
    dims = tuple(i for i, r in enumerate(reduced) if r)
    xt = torch.tensor(x, dtype=torch.float64).reshape(expanded)
    _, mean, rstd = normlab.normalize(x, pattern, rms=rms, eps=EPS, return_stats=True, **sizes)
    stats_shape = tuple(1 if r else s for s, r in zip(expanded, reduced))
    assert rstd.shape == stats_shape
    if rms:
        assert mean is None
        expected_rstd = torch.rsqrt(xt.square().mean(dim=dims, keepdim=True) + EPS)
    else:
        var, expected_mean = torch.var_mean(xt, dim=dims, correction=0, keepdim=True)
        expected_rstd = torch.rsqrt(var + EPS)
        assert mean.shape == stats_shape
        np.testing.assert_allclose(mean, expected_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rstd, expected_rstd.numpy(), rtol=1e-10)


# ---- finite differences -------------------------------------------------------------------


class _Normalize(torch.autograd.Function):
    """normlab's forward and backward as one autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, x, weight, bias, pattern, params, rms, sizes):
        ctx.save_for_backward(x, weight)
        ctx.args = (pattern, params, rms, sizes)
        y = normlab.normalize(x.numpy(), pattern, weight=weight.numpy(), bias=bias.numpy(), params=params, rms=rms,
                              **sizes)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        pattern, params, rms, sizes = ctx.args
        gx, gw, gb = normlab.normalize_backward(grad_y.numpy(), x.numpy(), pattern, weight=weight.numpy(),
                                                params=params, rms=rms, **sizes)
        return torch.from_numpy(gx), torch.from_numpy(gw), torch.from_numpy(gb), None, None, None, None


@pytest.mark.parametrize(
    "pattern, shape, params, rms, sizes",
    [
        ("[b] c [h w]", (3, 2, 2, 2), "c", False, {}),
        ("b t [d]", (2, 3, 4), "d", False, {}),
        ("b [c h w]", (2, 3, 2, 2), "c", False, {}),
        ("b (g [c]) [h]", (2, 4, 3), "(g c)", False, {"g": 2}),
        ("b [t] d", (2, 3, 4), "t d", False, {}),
        ("b t [d]", (2, 3, 4), "d", True, {}),
    ],
)
def test_gradients_pass_torch_gradcheck(pattern, shape, params, rms, sizes):
    rng = np.random.default_rng(7)
    plan = normlab.make_plan(pattern, shape, params, **sizes)
    x = torch.tensor(rng.standard_normal(shape), requires_grad=True)
    weight = torch.tensor(rng.standard_normal(plan.param_shape) + 1, requires_grad=True)
    bias = torch.tensor(rng.standard_normal(plan.param_shape), requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w, b: _Normalize.apply(a, w, b, pattern, params, rms, sizes), (x, weight, bias), eps=1e-6, atol=1e-5
    )
