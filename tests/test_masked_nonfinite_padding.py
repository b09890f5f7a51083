"""NaN and Inf in the padding (the elements a mask leaves uncounted) stay there: the counted
outputs, the input gradients and the parameter gradients of a loss on the counted outputs
are those of torch's float64 autograd on the counted elements alone (the oracle), in the
NumPy API (both backends, every kernel layout) and in normlab.torch (the op, its double
backward and forward-mode AD, batched gradients, the modules). Hypothesis draws the
shapes, the masks, the non-finite values and where they sit."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normlab

torch = pytest.importorskip("torch")

EPS = 1e-5
# (pattern, shape, params, group of element (i0, i1, i2) as a function of its index)
LAYOUTS = {
    "rows": ("b [d]", "d", lambda i: i[0]),  # layer norm, one (rows, n) unit per row
    "channels-first": ("[b] c [t]", "c", lambda i: i[1]),  # batch norm with inner positions
    "channels-last": ("[b t] c", "c", lambda i: i[2]),  # batch norm, one value per channel and row
}


def _shape(layout, data):
    dims = [data.draw(st.integers(1, 4)) for _ in range(3)]
    return (dims[0], dims[1] * dims[2]) if layout == "rows" else tuple(dims)


@st.composite
def _padded(draw, layout):
    """(x, mask, grad_y, weight, bias): garbage (NaN, ±Inf, huge) in some uncounted places,
    grad_y zero there (the loss reads the counted outputs alone)."""
    shape = _shape(layout, draw(st.data()))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    offset = draw(st.sampled_from([0.0, 3.0, -1e3]))
    x = rng.standard_normal(shape) + offset
    mask = rng.random(shape) < draw(st.sampled_from([0.3, 0.6, 0.9]))
    garbage = np.array([np.nan, np.inf, -np.inf, 1e308])
    padding = ~mask & (rng.random(shape) < 0.7)
    x[padding] = rng.choice(garbage, size=int(padding.sum()))
    grad_y = np.where(mask, rng.standard_normal(shape), 0.0)
    channels = shape[1] if layout != "channels-last" else shape[2]
    channels = shape[-1] if layout == "rows" else channels
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    return x, mask, grad_y, weight, bias


def _kept_alone(layout, x, mask):
    """``f(x, weight, bias) -> y`` in torch float64 operations on the counted elements of
    each group alone (nothing uncounted enters the graph; 0 at uncounted places), and a
    boolean array of the elements whose group has nothing counted."""
    pattern, params, group_of = LAYOUTS[layout]
    channel_axis = x.ndim - 1 if layout in ("rows", "channels-last") else 1
    groups = {}
    for index in zip(*np.nonzero(mask)):
        groups.setdefault(group_of(index), []).append(int(np.ravel_multi_index(index, x.shape)))
    channel_of = np.unravel_index(np.arange(x.size), x.shape)[channel_axis]
    dead = np.array([group_of(index) not in groups for index in np.ndindex(x.shape)]).reshape(x.shape)
    keep = torch.tensor(mask)
    indices = [(torch.tensor(members), torch.tensor(channel_of[members])) for members in groups.values()]

    def f(xt, wt, bt):
        flat = torch.where(keep, xt, 0).reshape(-1)
        y = torch.zeros(x.size, dtype=torch.float64)
        for members, channels in indices:
            values = flat[members]
            mean = values.mean()
            rstd = torch.rsqrt(((values - mean) ** 2).mean() + EPS)
            y = y.index_put((members,), (values - mean) * rstd * wt[channels] + bt[channels])
        return y.reshape(x.shape)

    return f, dead, channel_of.reshape(x.shape)


def _oracle(layout, x, mask, grad_y, weight, bias):
    """Counted outputs and the gradients of Σ grad_y·y, by torch autograd in float64 on
    the counted elements of each group alone."""
    f, _, _ = _kept_alone(layout, x, mask)
    inputs = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    y = f(*inputs)
    # (nothing counted anywhere: y holds no input)
    grads = torch.autograd.grad(y, inputs, torch.tensor(grad_y), allow_unused=True) if y.requires_grad else [None] * 3
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return y.detach().numpy(), [g.numpy() for g in grads]


def _assert_matches(layout, x, mask, grad_y, weight, bias, y, grads):
    want_y, want_grads = _oracle(layout, x, mask, grad_y, weight, bias)
    np.testing.assert_allclose(np.where(mask, y, 0.0), np.where(mask, want_y, 0.0), rtol=1e-9, atol=1e-9)
    _, dead, channel = _kept_alone(layout, x, mask)
    # a group with nothing counted gives exactly bias, garbage and all
    np.testing.assert_array_equal(y[dead], bias[channel[dead]])
    for name, got, want in zip(("x", "weight", "bias"), grads, want_grads):
        assert np.isfinite(got).all(), f"{name} gradient not finite: {got}"
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-7, atol=1e-9,
                                   err_msg=f"{name} gradient")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@given(data=st.data())
def test_nonfinite_padding_never_reaches_the_counted_gradients_in_the_numpy_api(backend, layout, data):
    x, mask, grad_y, weight, bias = data.draw(_padded(layout))
    pattern, params, _ = LAYOUTS[layout]
    with np.errstate(invalid="ignore", over="ignore"):
        y, mean, rstd = normlab.normalize(x, pattern, mask=mask, weight=weight, bias=bias, params=params, eps=EPS,
                                          return_stats=True, backend=backend)
        grads = normlab.normalize_backward(grad_y, x, pattern, mask=mask, weight=weight, params=params, eps=EPS,
                                           mean=mean, rstd=rstd, backend=backend)
    _assert_matches(layout, x, mask, grad_y, weight, bias, y, grads)


def _torch_grads(layout, x, mask, grad_y, weight, bias, create_graph):
    from normlab.torch.masked import normalize_masked

    pattern, params, _ = LAYOUTS[layout]
    inputs = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    y = normalize_masked(inputs[0], pattern, weight=inputs[1], bias=inputs[2], params=params, eps=EPS,
                         mask=torch.tensor(mask)).y
    grads = torch.autograd.grad(y, inputs, torch.tensor(grad_y), create_graph=create_graph)
    return y.detach().numpy(), [g.detach().numpy() for g in grads]


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@given(data=st.data())
def test_nonfinite_padding_never_reaches_the_counted_gradients_in_torch(layout, create_graph, data):
    x, mask, grad_y, weight, bias = data.draw(_padded(layout))
    y, grads = _torch_grads(layout, x, mask, grad_y, weight, bias, create_graph=create_graph)
    _assert_matches(layout, x, mask, grad_y, weight, bias, y, grads)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@given(data=st.data())
def test_nonfinite_padding_stays_out_of_batched_gradients_and_forward_mode_tangents(layout, data):
    from normlab.torch.masked import normalize_masked

    x, mask, grad_y, weight, bias = data.draw(_padded(layout))
    pattern, params, _ = LAYOUTS[layout]
    keep = torch.tensor(mask)

    def ours(xt, wt, bt):
        return normalize_masked(xt, pattern, weight=wt, bias=bt, params=params, eps=EPS, mask=keep).y

    inputs = [torch.tensor(a) for a in (x, weight, bias)]
    # tangents of the counted inputs and of the parameters (the padding's own is its business)
    tangents = [torch.where(keep, torch.tensor(grad_y[::-1].copy()), 0.0), torch.ones(len(weight)),
                torch.full((len(bias),), 0.5)]
    f, dead, channel = _kept_alone(layout, x, mask)
    want_y, want_tangent = torch.func.jvp(f, tuple(inputs), tuple(tangents))
    y, tangent = torch.func.jvp(ours, tuple(inputs), tuple(tangents))
    torch.testing.assert_close(torch.where(keep, y, 0.0), torch.where(keep, want_y, 0.0))
    np.testing.assert_array_equal(y.numpy()[dead], bias[channel[dead]])
    torch.testing.assert_close(torch.where(keep, tangent, 0.0), torch.where(keep, want_tangent, 0.0))
    # is_grads_batched: a vmap over the backward
    leaves = [t.clone().requires_grad_() for t in inputs]
    batch = torch.stack([torch.tensor(grad_y), torch.tensor(grad_y[::-1].copy()) * keep])
    got = torch.autograd.grad(ours(*leaves), leaves, batch, is_grads_batched=True)
    for row in range(2):
        _, want = _oracle(layout, x, mask, batch[row].numpy(), weight, bias)
        for name, g, w in zip(("x", "weight", "bias"), got, want):
            np.testing.assert_allclose(g[row].numpy(), w, rtol=1e-7, atol=1e-9, err_msg=f"{name} gradient")


def _twin(name, **options):
    import normlab.torch as nt

    return lambda width: getattr(nt, name)(width, eps=EPS, **options)


@pytest.mark.parametrize("make, rms, offset", [
    (_twin("LayerNorm"), False, 0.0),
    (_twin("RMSNorm"), True, 0.0),
    (_twin("RMSNorm", casting="llama"), True, 0.0),
    (_twin("RMSNorm", casting="gemma", weight_offset=1.0), True, 1.0),
], ids=["LayerNorm", "RMSNorm", "RMSNorm-llama", "RMSNorm-gemma"])
@given(data=st.data())
def test_nonfinite_padding_never_reaches_a_twins_gradients(make, rms, offset, data):
    """The twins' mask= (the recipes' too: x̂ in float32, then the recipe's weight) against
    torch float64 autograd on the counted elements of each row alone."""
    rows, width = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x = rng.standard_normal((rows, width)) * 2 + data.draw(st.sampled_from([0.0, 5.0]))
    mask = rng.random((rows, width)) < 0.6
    x[~mask] = rng.choice([np.nan, np.inf, -np.inf], size=int((~mask).sum()))
    grad_y = np.where(mask, rng.standard_normal((rows, width)), 0.0)
    module = make(width)
    with torch.no_grad():
        module.weight.normal_()
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    y = module(xt, mask=torch.tensor(mask))
    params = [module.weight] + ([module.bias] if getattr(module, "bias", None) is not None else [])
    grads = torch.autograd.grad(y, [xt] + params, torch.tensor(grad_y, dtype=y.dtype))

    x64 = torch.tensor(np.where(mask, x, 0.0), requires_grad=True)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    keep = torch.tensor(mask)
    count = keep.sum(-1, keepdim=True).clamp_min(1)
    mean = 0.0 if rms else torch.where(keep, x64, 0).sum(-1, keepdim=True) / count
    var = (torch.where(keep, x64 - mean, 0) ** 2).sum(-1, keepdim=True) / count
    ref = (x64 - mean) * torch.rsqrt(var + EPS) * (ref_params[0] + offset)
    ref = ref + ref_params[1] if len(ref_params) > 1 else ref
    want = torch.autograd.grad(torch.where(keep, ref, 0), [x64] + ref_params, torch.tensor(grad_y))
    for name, got, expected in zip(("x", "weight", "bias"), grads, want):
        assert torch.isfinite(got).all(), f"{name} gradient not finite: {got}"
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5, msg=f"{name} gradient")


def _multiplications(call) -> int:
    """How many elementwise products (aten.mul) ``call()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        products = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.products += func is torch.ops.aten.mul.Tensor
            return func(*args, **(kwargs or {}))

    with Count() as count:
        call()
    return count.products


@pytest.mark.parametrize("family", ["llama.modeling_llama.LlamaRMSNorm", "gemma.modeling_gemma.GemmaRMSNorm"])
def test_a_converted_recipe_norm_with_mask_multiplies_by_its_weight_as_often_as_the_original(family):
    """The confinement of non-finite padding above ran the recipe's weight product three times
    (plus isfinite) on every mask= call, clean padding and torch.no_grad included. Without a
    gradient for the weight it needs one product, as the original's forward; with one, a
    second for the padding (with the detached weight). Oracle: the original class's own
    forward, counted alike."""
    import importlib

    import normlab.torch as nt

    pytest.importorskip("transformers")
    module, name = f"transformers.models.{family}".rsplit(".", 1)
    family_norm = getattr(importlib.import_module(module), name)
    original, twin = family_norm(64), nt.convert(torch.nn.Sequential(family_norm(64)))[0]
    x = torch.randn(2, 5, 64).bfloat16()
    mask = (torch.arange(5) < torch.tensor([5, 3])[:, None])[..., None]
    for grad, more in ((False, 0), (True, 1)):
        with torch.set_grad_enabled(grad):
            theirs = _multiplications(lambda: original(x))
            ours = _multiplications(lambda: twin(x, mask=mask))
        assert ours <= theirs + more, (grad, ours, theirs)


class _Padded(torch.nn.Module):
    def __init__(self, width, segmented):
        import normlab.torch as nt

        super().__init__()
        self.segmented = segmented
        self.norm = nt.Norm("[n] c", params="c", c=width) if segmented else nt.LayerNorm(width, eps=EPS)

    def forward(self, x, mask, ids):
        return self.norm(x, mask=mask, segment_ids=ids, num_segments=2) if self.segmented else self.norm(x, mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("capture", ["jit.trace", "export"])
@pytest.mark.parametrize("segmented", [False, True], ids=["mask", "mask+segments"])
def test_nonfinite_padding_never_reaches_the_gradients_of_a_traced_or_exported_model(capture, segmented):
    """A model traced or exported with mask= (and segment_ids=) trains on NaN-padded data as
    in eager mode: the gradients of a loss on the counted outputs are those of the eager
    call on the same data with its padding made finite (the kernels: the properties above)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5)) * 2 + 1
    mask = rng.random((6, 5)) < 0.6
    mask[:, 0] = True
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    grad_y = torch.tensor(np.where(mask, rng.standard_normal((6, 5)), 0.0))
    model = _Padded(5, segmented).double()
    with torch.no_grad():
        model.norm.weight.normal_()
    keep = torch.tensor(mask)
    example = (torch.tensor(x), keep, ids)
    captured = torch.jit.trace(model, example) if capture == "jit.trace" else torch.export.export(model, example).module()

    def gradients(module, values):
        xt = torch.tensor(values, requires_grad=True)
        return torch.autograd.grad(module(xt, keep, ids), (xt, model.norm.weight), grad_y)

    garbage = np.where(mask, x, rng.choice([np.nan, np.inf, -np.inf], size=x.shape))
    want = gradients(model, np.where(mask, x, 0.0))
    for got, expected in zip(gradients(captured, garbage), want):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("capture", ["jit.trace", "export"])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_a_recipe_norm_captured_under_no_grad_trains_on_nonfinite_padding(capture, casting):
    """A converted LlamaRMSNorm or GemmaRMSNorm traced or exported under torch.no_grad (as one
    exports for inference) and trained later on NaN-padded data: the graph is recorded once,
    so it must keep the padding out of the weight's gradient whatever grad mode recorded it.
    Oracle: the same captured graph on the data with its padding made finite."""
    import normlab.torch as nt

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 5)) * 2 + 1
    mask = rng.random((6, 5)) < 0.6
    mask[:, 0] = True
    keep = torch.tensor(mask)
    grad_y = torch.tensor(np.where(mask, rng.standard_normal((6, 5)), 0.0), dtype=torch.float32)

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nt.RMSNorm(5, eps=EPS, casting=casting, weight_offset=1.0 if casting == "gemma" else 0.0)

        def forward(self, values, mask):
            return self.norm(values, mask=mask)

    model = Padded()
    with torch.no_grad():
        model.norm.weight.normal_()
        example = (torch.tensor(x, dtype=torch.float32), keep)
        captured = (torch.jit.trace(model, example) if capture == "jit.trace"
                    else torch.export.export(model, example).module())

    def gradients(values):
        xt = torch.tensor(values, dtype=torch.float32, requires_grad=True)
        return torch.autograd.grad(captured(xt, keep), (xt, model.norm.weight), grad_y)

    want = gradients(np.where(mask, x, 0.0))
    got = gradients(np.where(mask, x, rng.choice([np.nan, np.inf, -np.inf], size=x.shape)))
    for name, mine, expected in zip(("x", "weight"), got, want):
        assert torch.isfinite(mine).all(), f"{name} gradient not finite: {mine}"
        torch.testing.assert_close(mine, expected, msg=f"{name} gradient")
