"""Layer, RMS and group norm (and row patterns of ``Norm``) with gradients: the cached
kernel path with autograd. Oracles: torch.nn's modules and torch autograd in float64,
gradcheck and gradgradcheck."""

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402
from tests.twins import randomized_pair  # noqa: E402
from normlab.torch import modules  # noqa: E402

# (torch.nn class, twin, constructor arguments, input shape)
ROW_MODULES = [
    ("LayerNorm", (48,), (3, 5, 48)),
    ("LayerNorm", ((4, 12),), (2, 4, 12)),
    ("RMSNorm", (48,), (3, 5, 48)),
    ("GroupNorm", (4, 12), (2, 12, 5, 5)),
    ("GroupNorm", (1, 6), (3, 6, 7)),
]


_pair = randomized_pair


@pytest.fixture
def no_full_path(monkeypatch):
    """Fails a test whose module call leaves the cached path for the general one."""
    def full_path(*a, **k):
        raise AssertionError("the call took the general autograd path")

    monkeypatch.setattr(modules, "_normalize", full_path)


def _grads(module, x, grad_y, inputs):
    return torch.autograd.grad(module(x), inputs, grad_y)


@pytest.mark.parametrize("cls_name, args, shape", ROW_MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norm_gradients_match_torch_autograd_in_float64(cls_name, args, shape, dtype, no_full_path):
    torch.manual_seed(0)
    reference, twin = _pair(cls_name, args, torch.float64)
    twin.to(dtype)
    for _ in range(2):  # the second call reuses the cached plans
        x64 = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
        grad_y = torch.randn(shape, dtype=torch.float64)
        expected = _grads(reference, x64, grad_y, (x64, *reference.parameters()))
        x = x64.detach().to(dtype).requires_grad_()
        got = _grads(twin, x, grad_y.to(dtype), (x, *twin.parameters()))
        tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
        for mine, theirs in zip(got, expected):
            assert mine.dtype == dtype
            torch.testing.assert_close(mine.double(), theirs, **tolerance)


@pytest.mark.parametrize("cls_name, args, shape", ROW_MODULES)
def test_row_norms_pass_gradcheck_and_gradgradcheck(cls_name, args, shape, no_full_path):
    torch.manual_seed(1)
    _, twin = _pair(cls_name, args, torch.float64)
    small = (2,) + shape[1:]
    x = torch.randn(small, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in twin.named_parameters()]

    def function(x, *weights):
        return torch.func.functional_call(twin, dict(zip(names, weights)), (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in twin.parameters()))
    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x and bias"])
def test_only_the_gradients_asked_for_are_computed_and_they_match_torch(wanted, no_full_path):
    reference, twin = _pair("LayerNorm", (16,), torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad="x" in wanted)
    for module in (reference, twin):
        module.weight.requires_grad_("weight" in wanted)
        module.bias.requires_grad_("bias" in wanted)
    grad_y = torch.randn(5, 16, dtype=torch.float64)
    outputs = []
    for module in (reference, twin):
        y = module(x)
        y.backward(grad_y)
        outputs.append([None if t.grad is None else t.grad.clone() for t in (x, module.weight, module.bias)])
        x.grad = None
    for mine, theirs in zip(outputs[1], outputs[0]):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs)


def test_an_expanded_output_gradient_and_a_sum_loss_match_torch(no_full_path):
    reference, twin = _pair("RMSNorm", (32,), torch.float64)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(reference(x).sum(), (x, reference.weight))  # grad_y: ones, stride 0
    got = torch.autograd.grad(twin(x).sum(), (x, twin.weight))
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs)


def test_changing_the_input_in_place_before_backward_raises_as_torch_does(no_full_path):
    twin = nt.LayerNorm(8)
    x = torch.randn(3, 8, requires_grad=True)
    source = x * 1.0
    y = twin(source)
    source.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_pattern_norm_over_rows_takes_the_cached_path_and_matches_layer_norm(no_full_path):
    reference = torch.nn.LayerNorm(24, dtype=torch.float64)
    twin = nt.Norm("b t [d]", params="d", d=24, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
        twin.weight.copy_(reference.weight)
        twin.bias.copy_(reference.bias)
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 3, 24, dtype=torch.float64)
    expected = torch.autograd.grad(reference(x), (x, reference.weight, reference.bias), grad_y)
    got = torch.autograd.grad(twin(x), (x, twin.weight, twin.bias), grad_y)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs)


def test_parameters_in_another_order_than_the_pattern_get_their_gradients_in_their_own_layout(no_full_path):
    # params "(c h)" over the pattern's "[h c]": the kernel's table is the weight transposed
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    twin = nt.Norm("b [h c]", params="(c h)", h=4, c=5, dtype=torch.float64)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        twin.bias.uniform_(-1, 1)
    weight = twin.weight.detach().clone().requires_grad_()
    bias = twin.bias.detach().clone().requires_grad_()
    grad_y = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = torch.autograd.grad(
        torch.nn.functional.layer_norm(x, (4, 5), weight.reshape(5, 4).T, bias.reshape(5, 4).T), (x, weight, bias),
        grad_y)
    got = torch.autograd.grad(twin(x), (x, twin.weight, twin.bias), grad_y)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs)


def test_float32_gradients_keep_float64_accuracy_far_from_zero_and_on_constant_rows(no_full_path):
    # |mean|/std = 1e6 in one row, a constant row, a symmetric row
    rows = np.stack([1e6 + np.random.default_rng(0).standard_normal(64), np.full(64, 3.25),
                     np.linspace(-1, 1, 64)]).astype(np.float32)
    reference, twin = _pair("LayerNorm", (64,), torch.float64)
    twin.float()
    x64 = torch.from_numpy(rows).double().requires_grad_()
    grad_y = torch.randn(3, 64, dtype=torch.float64)
    expected = _grads(reference, x64, grad_y, (x64, *reference.parameters()))
    x = torch.from_numpy(rows).requires_grad_()
    got = _grads(twin, x, grad_y.float(), (x, *twin.parameters()))
    for mine, theirs in zip(got, expected):
        scale = theirs.abs().max()
        assert (mine.double() - theirs).abs().max() <= 1e-4 * scale


def test_a_nan_stays_in_its_row_of_every_gradient(no_full_path):
    reference, twin = _pair("LayerNorm", (16,), torch.float64)
    x = torch.randn(4, 16, dtype=torch.float64)
    x[2, 5] = float("nan")
    x.requires_grad_()
    grad_y = torch.randn(4, 16, dtype=torch.float64)
    clean = torch.tensor([0, 1, 3])
    (grad_x,) = torch.autograd.grad(twin(x), (x,), grad_y)
    assert grad_x[2].isnan().all()
    expected = torch.autograd.grad(reference(x[clean]), (x,), grad_y[clean])[0][clean]
    torch.testing.assert_close(grad_x[clean], expected)


def _definition(x, weight, bias, reduced, eps):
    """Layer norm from its definition in float64 torch operations (autograd is the oracle)."""
    mean = x.mean(dim=reduced, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=reduced, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("pattern, params, shape, param_shape, reduced", [
    ("b [t d]", "d", (40, 3, 8), (8,), (1, 2)),  # per-element weights repeating along the row
    ("b t [d]", "t d", (20, 3, 8), (3, 8), (2,)),  # weights that differ from row to row
    ("b [d]", "d", (45, 16), (16,), (1,)),  # more rows than one float32 accumulation holds
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pattern_norm_parameter_layouts_match_the_definition_under_autograd(pattern, params, shape, param_shape,
                                                                            reduced, dtype, no_full_path):
    torch.manual_seed(2)
    sizes = dict(zip(params.split(), param_shape))  # weight (3, 8) over "t d" broadcasts against (b, t, d)
    twin = nt.Norm(pattern, params=params, dtype=dtype, **sizes)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        twin.bias.uniform_(-1, 1)
    x64 = (torch.randn(shape, dtype=torch.float64) * 2 + 5).requires_grad_()
    w64 = twin.weight.detach().double().requires_grad_()
    b64 = twin.bias.detach().double().requires_grad_()
    grad_y = torch.randn(shape, dtype=torch.float64)
    expected = torch.autograd.grad(_definition(x64, w64, b64, reduced, twin.eps), (x64, w64, b64), grad_y)
    x = x64.detach().to(dtype).requires_grad_()
    got = torch.autograd.grad(twin(x), (x, twin.weight, twin.bias), grad_y.to(dtype))
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine.double(), theirs, **tolerance)


@pytest.mark.parametrize("scale", [1e-33, 1e31, 1e-40])
def test_float32_rows_of_extreme_scale_keep_their_gradients(scale, no_full_path):
    # rstd near 1e33, 1e-31 or 1e40 (beyond float32: only the float64 arithmetic holds it)
    reference, twin = _pair("LayerNorm", (32,), torch.float64)
    reference.eps = twin.eps = 0.0
    twin.float()
    base = torch.randn(3, 32, dtype=torch.float64)
    x64 = (base * scale).float().double().requires_grad_()
    grad_y = torch.randn(3, 32, dtype=torch.float64)
    expected = _grads(reference, x64, grad_y, (x64, *reference.parameters()))
    x = x64.detach().float().requires_grad_()
    got = _grads(twin, x, grad_y.float(), (x, *twin.parameters()))
    if scale < 1e-38:  # grad_x (about 1e40) is past float32's range; the parameter gradients are not
        got, expected = got[1:], expected[1:]
    for mine, theirs in zip(got, expected):
        assert torch.isfinite(mine).all()
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_float32_gradients_are_bit_identical_whatever_torch_threads_allow():
    from normlab import kernels

    rows = -(-2 * kernels.SERIAL_BELOW // 256)  # large enough for the threaded kernel
    x = torch.randn(rows, 256) * 3 + 1
    grad_y = torch.randn(rows, 256)
    before = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            twin = nt.LayerNorm(256)
            leaf = x.clone().requires_grad_()
            results.append(torch.autograd.grad(twin(leaf), (leaf, twin.weight, twin.bias), grad_y))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert one.numpy().tobytes() == two.numpy().tobytes()


def test_a_changed_or_replaced_weight_is_seen_by_the_next_call_with_gradients(no_full_path):
    reference, twin = _pair("LayerNorm", (8,), torch.float32)
    x = torch.randn(3, 8, requires_grad=True)
    grad_y = torch.randn(3, 8)

    def check():
        for mine, theirs in zip(_grads(twin, x, grad_y, (x, twin.weight, twin.bias)),
                                _grads(reference, x, grad_y, (x, reference.weight, reference.bias))):
            torch.testing.assert_close(mine, theirs)

    check()  # fills the cache
    with torch.no_grad():
        for module in (reference, twin):
            module.weight.mul_(2)
            module.bias.add_(1)
    check()
    weight = torch.linspace(0.5, 2, 8)
    twin.weight, reference.weight = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    check()


def test_float32_parameter_gradients_over_many_rows_keep_float64_accuracy(no_full_path):
    # float32 sums over thousands of rows would drift by about 1e-5; the float64 parts do not
    reference, twin = _pair("LayerNorm", (16,), torch.float64)
    twin.float()
    x = torch.randn(50_000, 16)
    grad_y = torch.full((50_000, 16), 1.1)
    x64 = x.double().requires_grad_()
    expected = torch.autograd.grad(reference(x64), (reference.weight, reference.bias), grad_y.double())
    got = torch.autograd.grad(twin(x.requires_grad_()), (twin.weight, twin.bias), grad_y)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-6, atol=1e-6 * float(theirs.abs().max()))


@pytest.mark.parametrize("rms", [False, True])
def test_rows_of_extreme_scale_among_ordinary_ones_get_float64_accurate_gradients(rms, no_full_path):
    """The float32 backward runs a chunk of rows without a test per row only where every
    row's rstd suits float32. A row of values near ±float32's largest (x − mean would
    overflow in float32) or of tiny values, among ordinary rows, sends its chunk through
    the general loop, where that row runs in float64. Oracle: torch
    autograd of torch.nn.functional's norm in float64 on the same float32 values."""
    rows, n = 512, 64  # several chunks of parameter-gradient rows
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(11)) + 0.5
    x[3] *= 1e-35
    x[300] = torch.where(torch.arange(n) % 16 == 0, -3e38, 3e38)
    grad_y = torch.randn(rows, n, generator=torch.Generator().manual_seed(12))
    twin = nt.RMSNorm(n, eps=0.0) if rms else nt.LayerNorm(n, eps=0.0)
    with torch.no_grad():
        twin.weight.uniform_(0.5, 1.5)
        if not rms:
            twin.bias.uniform_(-1, 1)
    leaf = x.clone().requires_grad_()
    params = [twin.weight] if rms else [twin.weight, twin.bias]
    ours = torch.autograd.grad(twin(leaf), [leaf, *params], grad_y)
    x64 = x.double().requires_grad_()
    params64 = [p.detach().double().requires_grad_() for p in params]
    y64 = (torch.nn.functional.rms_norm(x64, (n,), params64[0], eps=0.0) if rms
           else torch.nn.functional.layer_norm(x64, (n,), *params64, eps=0.0))
    expected = torch.autograd.grad(y64, [x64, *params64], grad_y.double())
    scale = expected[0].abs().amax(dim=1, keepdim=True)  # grad_x spans 1e-39 to 1e35 between rows
    torch.testing.assert_close((ours[0].double() / scale), expected[0] / scale, rtol=0, atol=1e-5)
    for got, want in zip(ours[1:], expected[1:]):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


def _against_float64(reference, twin, x, grad_y):
    """The float32 twin's gradients of x and its parameters, and torch autograd's in float64
    through ``reference`` on the same values."""
    x64 = x.double().requires_grad_()
    expected = _grads(reference, x64, grad_y.double(), (x64, *reference.parameters()))
    leaf = x.clone().requires_grad_()
    return _grads(twin, leaf, grad_y, (leaf, *twin.parameters())), expected


@pytest.mark.parametrize("cls_name, args, shape, case", [
    ("LayerNorm", (4096,), (40, 4096), "gradient"),
    ("RMSNorm", (4096,), (40, 4096), "gradient"),
    ("GroupNorm", (4, 16), (2, 16, 300), "gradient"),
    ("LayerNorm", (4096,), (40, 4096), "weight"),
    ("RMSNorm", (4096,), (40, 4096), "weight"),
])
def test_float32_gradients_near_float32s_largest_match_float64(cls_name, args, shape, case, no_full_path):
    """Output gradients near float32's largest (5e36), or weights of 1e36, whose signs follow
    x: a row's Σ g·w·x̂ passes float32's largest though every gradient float64 gives is
    finite in float32. The float32 backward hands such calls to the float64 kernel.
    Oracle: torch autograd in float64 on the same float32 values; gradients whose float64
    value float32 cannot hold are left out."""
    reference, twin = _pair(cls_name, args, torch.float64)
    twin.float()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(13))
    magnitude = torch.rand(shape, generator=torch.Generator().manual_seed(14)) + 0.5
    if case == "gradient":
        grad_y = magnitude * torch.sign(x) * 5e36
    else:
        grad_y = magnitude * torch.sign(x)
        with torch.no_grad():
            for module in (reference, twin):
                module.weight.fill_(1e36)
    got, expected = _against_float64(reference, twin, x, grad_y)
    assert torch.isfinite(expected[0].float()).all()  # the case is one float32 can hold
    for mine, theirs in zip(got, expected):
        holds = torch.isfinite(theirs.float())
        if not holds.any():
            continue
        assert torch.isfinite(mine[holds]).all()
        torch.testing.assert_close(mine.double()[holds], theirs[holds], rtol=1e-4,
                                   atol=1e-4 * float(theirs[holds].abs().max()))


@pytest.fixture(params=[False, True], ids=["serial", "threaded"])
def threaded(request):
    """Each test twice: kernels as the size picks them, and every call threaded."""
    if request.param:
        request.getfixturevalue("every_call_threaded")


def test_float32_parameter_gradients_that_cancel_past_float32s_largest_match_float64(threaded, no_full_path):
    """One column's output gradients of ±2e38 over four rows, two of each sign, where x̂ is
    about 1: the weight and bias gradients summed in float32 pass float32's largest
    halfway and end near 0 in float64. Oracle: torch autograd in float64 on the same
    float32 values."""
    reference, twin = _pair("LayerNorm", (16384,), torch.float64)
    twin.float()
    x = torch.randn(4, 16384, generator=torch.Generator().manual_seed(16))
    x[:, 7] = 1.0
    grad_y = torch.zeros(4, 16384)
    grad_y[:, 7] = torch.tensor([2e38, 2e38, -2e38, -2e38])
    got, expected = _against_float64(reference, twin, x, grad_y)
    for mine, theirs in zip(got, expected):
        assert torch.isfinite(theirs.float()).all()
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_float32_group_norm_gradient_times_a_channel_weight_past_float32s_largest_matches_float64(threaded, no_full_path):
    """Output gradients of ±1e35 on two equal values of a group, times a channel weight of
    1e4: the group's sums stay 0, but g·w passes float32's largest, and float64 gives a
    finite grad_x (about 1e37, the rstd being 0.01). Oracle: torch autograd in float64 on
    the same float32 values."""
    reference, twin = _pair("GroupNorm", (1, 2), torch.float64)
    twin.float()
    with torch.no_grad():
        for module in (reference, twin):
            module.weight.fill_(1e4)
    x = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(17)) * 100
    x[0, 0, 5] = x[0, 0, 6] = 3.0
    grad_y = torch.zeros(1, 2, 64)
    grad_y[0, 0, 5], grad_y[0, 0, 6] = 1e35, -1e35
    got, expected = _against_float64(reference, twin, x, grad_y)
    for mine, theirs in zip(got, expected):
        assert torch.isfinite(theirs.float()).all()
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))



def test_a_small_layer_norm_step_decides_what_backward_saves_once_not_per_call(no_full_path):
    """Whether backward keeps the bias (torch's layer norm saves it, its group norm not) is
    the module's, decided when the cached call is built: deciding it in each forward
    hashed the module's Spec (a dataclass, hashed in Python) on every small call, whose
    cost is its Python work."""
    import cProfile
    import pstats

    norm, x = nt.LayerNorm(64), torch.randn(8, 64, requires_grad=True)
    norm(x).sum().backward()  # (builds the cached call)
    profile = cProfile.Profile()
    profile.runcall(lambda: norm(x).sum().backward())
    assert [name for _, _, name in pstats.Stats(profile).stats if name == "__hash__"] == []


@pytest.mark.parametrize("cls_name", ["LayerNorm", "RMSNorm"])
def test_float32_parameter_gradients_reach_autograd_in_float32_with_no_cast_left_to_it(cls_name, no_full_path):
    """The backward hands autograd the weight and bias gradients in the parameters' float32,
    rounded once from their float64 sums: the engine then makes no cast of its own
    (``aten::_to_copy``, two a small training step's). Oracle: torch's profiler for the
    casts, torch autograd in float64 on the same values for the gradients."""
    reference, twin = _pair(cls_name, (64,), torch.float64)
    twin.float()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(21)) * 3 + 100
    grad_y = torch.randn(4, 64, generator=torch.Generator().manual_seed(22))
    leaf = x.clone().requires_grad_()
    twin(leaf).backward(grad_y)  # (builds the cached call)
    for p in (leaf, *twin.parameters()):
        p.grad = None
    with torch.autograd.profiler.profile() as profile:
        twin(leaf).backward(grad_y)
    assert [e.name for e in profile.function_events if e.name == "aten::_to_copy"] == []
    x64 = x.double().requires_grad_()
    expected = torch.autograd.grad(reference(x64), (x64, *reference.parameters()), grad_y.double())
    for mine, theirs in zip((leaf.grad, *(p.grad for p in twin.parameters())), expected):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


def test_float32_parameter_gradients_past_float32s_largest_are_infinite_without_a_warning(no_full_path):
    """Weight and bias gradients whose float64 sums pass float32's largest round to ±inf,
    as torch's cast of the same float64 values gives, and with no NumPy overflow warning.
    Oracle: torch autograd in float64 on the same float32 values, cast by torch."""
    import warnings

    reference, twin = _pair("LayerNorm", (8,), torch.float64)
    twin.float()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(23))
    grad_y = torch.full((64, 8), 3e38)
    grad_y[:, 1] = -3e38
    x64 = x.double().requires_grad_()
    expected = torch.autograd.grad(reference(x64), (reference.weight, reference.bias), grad_y.double())
    leaf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torch.autograd.grad(twin(leaf), (twin.weight, twin.bias), grad_y)
    for mine, theirs in zip(got, expected):
        theirs = theirs.float()
        assert torch.isinf(theirs[:2]).all()  # the case is one past float32's range
        assert mine.dtype == torch.float32
        finite = torch.isfinite(theirs)
        assert torch.equal(mine[~finite], theirs[~finite])
        torch.testing.assert_close(mine[finite].double(), theirs[finite].double(), rtol=1e-4, atol=1e30)


EXPANDED_CASES = [("LayerNorm", (1, 64)), ("RMSNorm", (1, 64)), ("LayerNorm", (3, 5, 48)), ("RMSNorm", (64, 1024)),
                  ("GroupNorm", (2, 12, 5))]


def _module_pair(cls_name, shape):
    return _pair(cls_name, (4, shape[1]) if cls_name == "GroupNorm" else (shape[-1],), torch.float64)


@pytest.mark.parametrize("cls_name, shape", EXPANDED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ["sum", "expanded 2.5"])
def test_an_output_gradient_of_one_expanded_value_matches_torch_and_its_contiguous_copy(cls_name, shape, dtype, loss,
                                                                                      no_full_path):
    """A ``.sum()`` loss hands the norm's backward one value expanded to the output's shape
    (every stride 0), and so does an explicit ``torch.tensor(c).expand(shape)``. Oracles:
    torch autograd in float64 on the same values, and the twin's own gradients for the
    contiguous copy of that gradient, which must be the same bits."""
    reference, twin = _module_pair(cls_name, shape)
    twin.to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(24), dtype=dtype) * 3 + 7
    value = torch.tensor(1.0 if loss == "sum" else 2.5, dtype=dtype)
    for _ in range(2):  # the second call reuses the cached plans
        leaf = x.clone().requires_grad_()
        inputs = (leaf, *twin.parameters())
        y = twin(leaf)
        if loss == "sum":
            got = torch.autograd.grad(y.sum(), inputs)
        else:
            expanded = value.expand(shape)
            assert expanded.stride() == (0,) * len(shape)
            got = torch.autograd.grad(y, inputs, expanded)
        again = torch.autograd.grad(twin(leaf), inputs, value.expand(shape).contiguous())
        for mine, copy in zip(got, again):
            assert mine.dtype == dtype
            assert mine.numpy().tobytes() == copy.numpy().tobytes()
    x64 = x.double().requires_grad_()
    expected = torch.autograd.grad(reference(x64), (x64, *reference.parameters()), value.double().expand(shape))
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine.double(), theirs, **tolerance)


@pytest.mark.parametrize("cls_name, shape", EXPANDED_CASES[:3])
def test_a_sum_loss_of_a_row_norm_passes_gradcheck_and_gradgradcheck(cls_name, shape, no_full_path):
    """gradcheck of ``twin(x).sum()``: its analytical gradients come through the backward
    of one expanded value. Oracle: gradcheck's finite differences, and torch.nn's module."""
    reference, twin = _module_pair(cls_name, shape)
    names = [name for name, _ in twin.named_parameters()]

    def function(module):
        return lambda x, *weights: torch.func.functional_call(module, dict(zip(names, weights)), (x,)).sum()

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(25), requires_grad=True)
    inputs = (x, *(p.detach().clone().requires_grad_() for p in twin.parameters()))
    assert torch.autograd.gradcheck(function(twin), inputs)
    assert torch.autograd.gradgradcheck(function(twin), inputs)
    for mine, theirs in zip(torch.autograd.grad(function(twin)(*inputs), inputs),
                            torch.autograd.grad(function(reference)(*inputs), inputs)):
        torch.testing.assert_close(mine, theirs)


def test_a_sum_losss_expanded_gradient_is_copied_at_once_not_searched_for_rows(no_full_path):
    """The gradient of a ``.sum()`` loss (one value, every stride 0) holds no rows for the
    kernels to read where they lie: it is copied at once, without ``row_layout``'s search,
    part of a small training step's Python."""
    import cProfile
    import pstats

    norm, x = nt.LayerNorm(64), torch.randn(1, 64, requires_grad=True)
    norm(x).sum().backward()  # (builds the cached call)
    profile = cProfile.Profile()
    profile.runcall(lambda: norm(x).sum().backward())
    assert [name for _, _, name in pstats.Stats(profile).stats if name == "row_layout"] == []


@pytest.mark.parametrize("cls_name", ["LayerNorm", "RMSNorm"])
def test_a_small_training_steps_backward_runs_with_its_attributes_bound_not_the_general_call(cls_name,
                                                                                           no_full_path):
    """A step whose x and output gradient lie in C order (or the gradient is one expanded
    value) runs the backward's bound runner: no general call, no sums of one chunk's
    parts, no layout of one table's gradients, Python a small step's time is made of.
    The general call stays for what the runner hands it (see the tests of strided and
    extreme inputs above)."""
    import cProfile
    import pstats

    norm, x = getattr(nt, cls_name)(64), torch.randn(2, 64, requires_grad=True)
    norm(x).sum().backward()  # (builds the cached call)
    profile = cProfile.Profile()
    profile.runcall(lambda: (norm(x).sum().backward(), norm(x).backward(torch.ones(2, 64))))
    called = {name for path, _, name in pstats.Stats(profile).stats if path.endswith(("fast.py", "__init__.py"))}
    assert called.isdisjoint({"__call__", "_sum_parts", "_params", "_param_gradients"})


@pytest.mark.parametrize("cls_name", ["LayerNorm", "RMSNorm"])
def test_a_small_training_steps_forward_runs_the_bound_kernel_entry_and_matches_torch(cls_name, no_full_path):
    """The forward that autograd records, for x in C order, runs the forward's bound runner
    with statistics (the kernel's compiled entry, no ``FastForward.run``/``run_serial``
    calls); its output and gradients match torch.nn in float64. Oracle: torch.nn's module
    and torch autograd, in float64."""
    import cProfile
    import pstats

    reference, twin = _pair(cls_name, (64,), torch.float64)
    x = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(26), requires_grad=True)
    twin(x).sum().backward()  # (builds the cached call and the kernel's entry)
    profile = cProfile.Profile()
    y = profile.runcall(twin, x)
    called = {name for path, _, name in pstats.Stats(profile).stats if path.endswith("fast.py")}
    assert called.isdisjoint({"run_serial"}) and y.grad_fn is not None
    torch.testing.assert_close(y, reference(x))
    grad_y = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(27))
    for mine, theirs in zip(torch.autograd.grad(y, (x, *twin.parameters()), grad_y),
                            torch.autograd.grad(reference(x), (x, *reference.parameters()), grad_y)):
        torch.testing.assert_close(mine, theirs)


def _profilers_see_numba_dispatchers():
    """Whether cProfile records a call to a Numba dispatcher by its function's name: it does on
    Python 3.11, not on 3.12+, where profilers run on sys.monitoring and Numba's dispatcher (C
    code) reports no call to them; there only the gradients can be checked."""
    import cProfile
    import pstats

    import numba

    @numba.njit
    def probe(n):
        return n + 1

    probe(1)  # (compiles it)
    profile = cProfile.Profile()
    profile.runcall(probe, 1)
    return "probe" in {name for _, _, name in pstats.Stats(profile).stats}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls_name", ["LayerNorm", "RMSNorm"])
def test_a_small_training_steps_backward_runs_the_kernel_on_addresses_not_numbas_dispatcher(cls_name, dtype,
                                                                                           no_full_path):
    """A small backward runs the serial kernel from compiled code, handed the tensors'
    addresses (:mod:`normlab.kernels.addressed`), without the serial kernel's dispatcher and
    its checks of 19 arguments; statistics that a saved-tensor hook hands back strided are
    another type, which that code takes too. Both give torch.nn's gradients. Oracle: torch.nn's
    module and torch autograd."""
    import cProfile
    import pstats

    reference, twin = _pair(cls_name, (64,), dtype)
    x = torch.randn(2, 64, dtype=dtype, generator=torch.Generator().manual_seed(29), requires_grad=True)
    grad_y = torch.randn(2, 64, dtype=dtype, generator=torch.Generator().manual_seed(30))
    kernels = {"row_backward32", "row_backward"}  # (the dispatchers' functions, as profilers see them)
    addressed = {"row_backward32_at", "row_backward_at"}

    def strided(t):  # the statistics (x and the parameters are 64 wide) as every other element of a buffer
        if t.dim() == 0 or t.shape[-1] == 64:
            return t
        buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buffer[..., ::2] = t
        return buffer[..., ::2]

    def hooks(strided_statistics):
        if not strided_statistics:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, strided)

    for strided_statistics in (False, True):
        with hooks(strided_statistics):
            torch.autograd.grad(twin(x), (x, *twin.parameters()), grad_y)  # (builds the call and compiles)
            y = twin(x)
        profile = cProfile.Profile()
        mine = profile.runcall(torch.autograd.grad, y, (x, *twin.parameters()), grad_y)
        called = {name for _, _, name in pstats.Stats(profile).stats}
        if _profilers_see_numba_dispatchers():
            assert called.isdisjoint(kernels) and not called.isdisjoint(addressed), called & (kernels | addressed)
        for ours, theirs in zip(mine, torch.autograd.grad(reference(x), (x, *reference.parameters()), grad_y)):
            torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
def test_a_small_calls_python_checks_its_parameters_and_caches_without_helper_calls(grad, no_full_path):
    """A repeated small call reads its cache, its parameters' layout and the absence of
    parametrizations where they lie, without a call each (``module_cache``,
    ``tensor_layout``, ``parametrizations_computed``); its output and gradients still match
    torch.nn. Oracle: torch.nn's module and torch autograd, in float64."""
    import cProfile
    import pstats

    reference, twin = _pair("LayerNorm", (64,), torch.float64)
    x = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(28), requires_grad=grad)
    twin(x)  # (builds the cached call and the parameter tables)
    profile = cProfile.Profile()
    y = profile.runcall(twin, x)
    called = {name for _, _, name in pstats.Stats(profile).stats}
    assert called.isdisjoint({"module_cache", "tensor_layout", "parametrizations_computed"})
    torch.testing.assert_close(y, reference(x))
    if grad:
        for mine, theirs in zip(torch.autograd.grad(y.sum(), (x, *twin.parameters())),
                                torch.autograd.grad(reference(x).sum(), (x, *reference.parameters()))):
            torch.testing.assert_close(mine, theirs)
