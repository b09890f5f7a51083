"""The torch modules' fast paths when no gradient is needed: batch norm in evaluation as
one fused kernel pass (running statistics folded into one scale and shift per channel),
and layer, RMS and group norm straight into the row kernels with the plan cached per
input shape. Oracle: torch.nn's own modules with the same state."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import normlab.torch as nt  # noqa: E402
from tests.twins import randomized_pair  # noqa: E402


def _pair(cls_name, channels, dtype, affine=True):
    reference = getattr(torch.nn, cls_name)(channels, affine=affine, dtype=dtype)
    twin = getattr(nt, cls_name)(channels, affine=affine, dtype=dtype)
    with torch.no_grad():
        reference.running_mean.uniform_(-3, 3)
        reference.running_var.uniform_(0.2, 4)
        if affine:
            reference.weight.uniform_(0.5, 2)
            reference.bias.uniform_(-1, 1)
    twin.load_state_dict(reference.state_dict())
    return reference.eval(), twin.eval()


@pytest.mark.parametrize("cls_name, shape, channels_last", [
    ("BatchNorm1d", (16, 12), False),
    ("BatchNorm1d", (4, 12, 30), False),
    ("BatchNorm2d", (3, 12, 7, 9), False),
    ("BatchNorm2d", (3, 12, 7, 9), True),
    ("BatchNorm3d", (2, 12, 3, 4, 5), False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_eval_under_no_grad_matches_torch(cls_name, shape, channels_last, dtype, affine):
    reference, twin = _pair(cls_name, shape[1], dtype, affine)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), nt.use_path("kernel"):  # "auto" hands inputs this small to torch's op
        expected, got = reference(x), twin(x)
    torch.testing.assert_close(got, expected)
    assert got.stride() == expected.stride()


def test_changed_running_statistics_and_parameters_are_picked_up():
    reference, twin = _pair("BatchNorm2d", 5, torch.float32)
    x = torch.randn(2, 5, 4, 4)
    with torch.no_grad(), nt.use_path("kernel"):
        twin(x)  # folds the state once
        for module in (reference, twin):
            module.running_mean.add_(0.5)
            module.weight.mul_(3)
        torch.testing.assert_close(twin(x), reference(x))
        twin.eps = reference.eps = 0.5
        torch.testing.assert_close(twin(x), reference(x))
        twin.running_var = reference.running_var = torch.full((5,), 2.0)
        torch.testing.assert_close(twin(x), reference(x))
        for module in (reference, twin):  # a write through .data moves no version counter
            module.running_mean.data[1] = -4.0
            module.bias.data[2] = 9.0
        torch.testing.assert_close(twin(x), reference(x))


def test_batch_norm_eval_with_gradients_still_differentiates_like_torch():
    reference, twin = _pair("BatchNorm2d", 4, torch.float64)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for module in (reference, twin):
        y = module(x)
        grads.append(torch.autograd.grad((y * y).sum(), (x, module.weight, module.bias)))
    for mine, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, theirs)


def test_batch_norm_eval_under_no_grad_runs_the_fused_kernel_not_torch_operations(monkeypatch):
    from normlab.torch import compute

    reference, twin = _pair("BatchNorm2d", 3, torch.float32)

    def composite(*args, **kwargs):
        raise AssertionError("evaluation fell back to the torch operations")

    monkeypatch.setattr(compute, "_apply_stats", composite)
    x = torch.randn(2, 3, 5, 5)
    with torch.inference_mode(), nt.use_path("kernel"):
        torch.testing.assert_close(twin(x), reference(x))


def test_a_small_batch_norm_eval_call_checks_its_folding_without_helper_calls():
    """A repeated small evaluation call finds its running statistics' precision check
    where the module keeps it, and looks for fake tensors without a generator (frames a
    small call's time is made of: no ``module_cache``, no ``<genexpr>``); its output is
    still torch.nn's. Oracle: torch.nn's module with the same state."""
    import cProfile
    import pstats

    reference, twin = _pair("BatchNorm1d", 64, torch.float32)
    x = torch.randn(64, 64)
    with torch.no_grad():
        twin(x)  # (finds the check's answer and keeps it)
        profile = cProfile.Profile()
        y = profile.runcall(twin, x)
    called = {name for _, _, name in pstats.Stats(profile).stats}
    assert called.isdisjoint({"module_cache", "<genexpr>"})
    torch.testing.assert_close(y, reference(x))


def test_a_small_calls_thread_threshold_reads_the_pool_found_once_without_a_call():
    """Each kernel call asks ``threads.serial_below`` whether to start threads; once
    torch's pool has been looked for, the answer is read without ``_current_regions``'
    call (a frame of every small forward and backward). Oracle: torch.nn's module and
    torch autograd."""
    import cProfile
    import pstats

    reference, twin = randomized_pair("LayerNorm", (64,), torch.float32)
    x = torch.randn(2, 64, requires_grad=True)
    twin(x).sum().backward()  # (looks for the pool, builds the cached calls)
    profile = cProfile.Profile()
    y = profile.runcall(twin, x)
    grads = profile.runcall(torch.autograd.grad, y.sum(), (x, *twin.parameters()))
    called = {name for _, _, name in pstats.Stats(profile).stats}
    assert "serial_below" in called and "_current_regions" not in called
    torch.testing.assert_close(y, reference(x))
    for mine, theirs in zip(grads, torch.autograd.grad(reference(x).sum(), (x, *reference.parameters()))):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("case", ["LayerNorm no_grad", "LayerNorm training", "BatchNorm1d eval"])
def test_a_small_calls_tracing_check_is_torchs_own_flag_without_python_frames(case):
    """Each eager call asks whether torch.jit.trace is recording it; the twins read
    torch's flag itself, not ``torch.jit.is_tracing()``'s two frames around it (after
    ``torch.compiler.is_compiling()``, which Dynamo answers first). Output and gradients
    are still torch.nn's. Oracle: torch.nn's modules and torch autograd."""
    import cProfile
    import pstats

    if case.startswith("BatchNorm1d"):
        reference, twin = _pair("BatchNorm1d", 64, torch.float32)
        x = torch.randn(64, 64)
    else:
        reference, twin = randomized_pair("LayerNorm", (64,), torch.float32)
        x = torch.randn(2, 64, requires_grad=case.endswith("training"))
    with torch.set_grad_enabled(case.endswith("training")):
        twin(x)  # (builds the cached calls)
        profile = cProfile.Profile()
        y = profile.runcall(twin, x)
    called = {name for _, _, name in pstats.Stats(profile).stats}
    assert "is_tracing" not in called
    torch.testing.assert_close(y, reference(x))
    if x.requires_grad:
        for mine, theirs in zip(torch.autograd.grad(y.sum(), (x, *twin.parameters())),
                                torch.autograd.grad(reference(x).sum(), (x, *reference.parameters()))):
            torch.testing.assert_close(mine, theirs)


def test_batch_norm_eval_takes_torchs_op_below_the_crossover_and_the_fused_kernel_above(monkeypatch):
    from normlab import kernels
    from normlab.torch import compute

    calls = []
    original = kernels.scale_shift_view
    monkeypatch.setattr(kernels, "scale_shift_view", lambda *a, **k: calls.append(a) or original(*a, **k))
    reference, twin = _pair("BatchNorm2d", 8, torch.float32)
    small = torch.randn(2, 8, 16, 16)
    large = torch.randn(compute.EVAL_NATIVE_BELOW_BYTES // (4 * 8 * 64 * 64) + 1, 8, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(twin(small), reference(small))
        assert not calls
        torch.testing.assert_close(twin(large), reference(large))
        assert len(calls) == 1


@pytest.mark.parametrize("cls_name, args, shape", [
    ("LayerNorm", (48,), (3, 5, 48)),
    ("LayerNorm", ((4, 12),), (2, 4, 12)),
    ("RMSNorm", (48,), (3, 5, 48)),
    ("GroupNorm", (4, 12), (2, 12, 5, 5)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_norms_without_gradients_skip_autograd_and_match_torch(cls_name, args, shape, dtype, monkeypatch):
    from normlab.torch import modules

    torch.manual_seed(0)
    reference, twin = randomized_pair(cls_name, args, dtype)

    def full_path(*a, **k):
        raise AssertionError("the call took the autograd path")

    monkeypatch.setattr(modules, "_normalize", full_path)
    for _ in range(2):  # the second call reuses the cached plan
        x = torch.randn(shape, dtype=dtype) * 3 + 2
        with torch.inference_mode():
            torch.testing.assert_close(twin(x), reference(x))
        with torch.no_grad():
            torch.testing.assert_close(twin(x), reference(x))


def test_layer_norm_with_gradients_still_takes_autograd_and_matches_torch():
    reference, twin = torch.nn.LayerNorm(16, dtype=torch.float64), nt.LayerNorm(16, dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    grads = []
    for module in (reference, twin):
        with torch.no_grad():
            module(x)  # a no-grad call first fills the fast path's cache
        grads.append(torch.autograd.grad(module(x).square().sum(), (x, module.weight, module.bias)))
    for mine, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, theirs)


def test_a_changed_weight_is_seen_by_the_next_no_grad_call():
    reference, twin = torch.nn.LayerNorm(8), nt.LayerNorm(8)
    x = torch.randn(2, 8)
    with torch.no_grad():
        twin(x)
        for module in (reference, twin):
            module.weight.mul_(2)
            module.bias.add_(1)
        torch.testing.assert_close(twin(x), reference(x))
        twin.weight = reference.weight = torch.nn.Parameter(torch.full((8,), 3.0))
        torch.testing.assert_close(twin(x), reference(x))
        for module in (reference, twin):  # same Parameter object, new storage
            module.weight.data = torch.linspace(-1.0, 1.0, 8)
        torch.testing.assert_close(twin(x), reference(x))
        for module in (reference, twin):  # in place after new storage
            module.weight[3] = 7.0
        torch.testing.assert_close(twin(x), reference(x))


@pytest.mark.parametrize("grad", [False, True])
def test_a_write_through_data_is_seen_where_the_parameter_layout_is_a_copy(grad):
    """``Norm("b [h w]", "w h")`` lays its (w, h) weight out as an (h, w) table, a copy: a
    write through ``.data`` moves no version counter, so the copy must not be kept.
    Oracle: torch's layer norm over (h, w) times the transposed parameters."""
    torch.manual_seed(0)
    twin = nt.Norm("b [h w]", "w h", h=3, w=4)
    x = torch.randn(2, 3, 4, requires_grad=grad)

    def expected():
        normalized = torch.nn.functional.layer_norm(x.detach().reshape(2, 12), (12,)).reshape(2, 3, 4)
        return normalized * twin.weight.detach().t() + twin.bias.detach().t()

    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(twin(x), expected())
        twin.weight.data[0, 1] = 7.0
        twin.bias.data[2, 0] = -3.0
        torch.testing.assert_close(twin(x), expected())


_BUILT_IN_INFERENCE_MODE = [
    ("LayerNorm", (8,), (4, 3, 8)),
    ("RMSNorm", (8,), (4, 3, 8)),
    ("GroupNorm", (2, 8), (4, 8, 3)),
    ("BatchNorm1d", (8,), (4, 8, 3)),
    ("BatchNorm2d", (8,), (4, 8, 3, 2)),
    ("InstanceNorm1d", (8,), (4, 8, 3)),
]


def _call_in(mode: str, module, x):
    if mode == "inference_mode":
        with torch.inference_mode():
            return module(x)
    if mode == "no_grad":
        with torch.no_grad():
            return module(x)
    x = x.clone().requires_grad_()
    y = module(x)
    y.sum().backward()
    return y, x.grad


def _outcome(call):
    try:
        return call()
    except Exception as error:  # the oracle's exception type is the expected one
        return type(error)


@pytest.mark.parametrize("cls_name, args, shape", _BUILT_IN_INFERENCE_MODE)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_a_twin_built_inside_inference_mode_behaves_as_torch_nn(cls_name, args, shape, training, mode):
    """Parameters made inside ``torch.inference_mode`` are inference tensors, without a
    version counter: the cached parameter tables must not ask for one, and running
    statistics of inference tensors must not be written through NumPy outside inference
    mode, where torch raises. Oracle: torch.nn built the same way, its output or its
    exception type."""
    kwargs = {"affine": True, "track_running_stats": True} if cls_name == "InstanceNorm1d" else {}
    with torch.inference_mode():
        reference = getattr(torch.nn, cls_name)(*args, **kwargs).train(training)
        twin = getattr(nt, cls_name)(*args, **kwargs).train(training)
        twin.load_state_dict(reference.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = _outcome(lambda: _call_in(mode, reference, x))
    actual = _outcome(lambda: _call_in(mode, twin, x))
    if isinstance(expected, type):
        assert actual is expected
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(twin.get_buffer(name), buffer)
